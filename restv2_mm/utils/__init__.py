"""What the command-line tools share (``tool``) and the checks run before a Runner is built
(``preflight``)."""
