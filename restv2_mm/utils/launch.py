"""Start a tool in N processes on this machine: the command behind tools/dist_train.sh and
tools/dist_test.sh.

    python -m restv2_mm.utils.launch N SCRIPT [SCRIPT ARGUMENTS]

It checks the launch first, so that a bad one stops with one line instead of a traceback
from every process: with CUDA, N must not exceed the visible GPUs (one process per GPU,
NCCL); without CUDA, the N processes share the CPU (gloo, see :mod:`restv2_mm.utils.dist`).
The rendezvous port is ``PORT`` if set, checked to be free on the master node; on one
machine without ``PORT`` a free port is picked. Several machines set ``NNODES``,
``NODE_RANK``, ``MASTER_ADDR`` and ``PORT`` (default 29500) alike, as with mmdet's scripts.
The processes are then started by torchrun's own machinery; when one fails, torchrun stops
the others and this prints which rank failed and how, and exits with its status.
"""
import errno
import os
import os.path as osp
import signal
import socket
import sys
from typing import List, Mapping, Optional, Sequence

from .tool import ToolError

DEFAULT_PORT = 29500  # torchrun's and mmdet's, for runs over several machines
USAGE = 'usage: python -m restv2_mm.utils.launch NPROC SCRIPT [SCRIPT ARGUMENTS]'


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ToolError(f'{name}={value!r} must be a positive integer.')
    return number


def check_process_count(value: str) -> int:
    """The number of processes to start here; with CUDA, at most one per visible GPU."""
    try:
        nproc = int(value)
    except ValueError:
        nproc = 0
    if nproc < 1:
        raise ToolError(f'GPUS={value!r}: the number of processes to start must be a '
                        f'positive integer, e.g. 8 for 8 GPUs.')
    import torch
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            visible = os.environ.get('CUDA_VISIBLE_DEVICES')
            shown = f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''
            raise ToolError(
                f'{nproc} processes asked for, but this machine has {gpus} GPU(s) '
                f'visible{shown}. Each process needs a GPU of its own: ask for at most '
                f'{gpus}, or make more GPUs visible.')
    return nproc


def port_is_free(port: int) -> bool:
    """Whether a TCP server could listen on ``port`` on every interface of this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(('', port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    """A port that no one listens on now (the system's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('', 0))
        return sock.getsockname()[1]


def rendezvous_port(env: Mapping[str, str], nnodes: int, node_rank: int) -> int:
    """``PORT`` (checked where the rendezvous is served: node 0), or a free one on one
    machine, or 29500 for several machines, which must all agree on it."""
    if env.get('PORT'):
        port = _positive_int(env['PORT'], 'PORT')
        if port > 65535:
            raise ToolError(f'PORT={port} is not a TCP port (1-65535).')
        how = f'PORT={port}'
    elif nnodes == 1:
        return free_port()
    else:
        port, how = DEFAULT_PORT, f'the default port {DEFAULT_PORT} (PORT is not set)'
    if node_rank == 0 and not port_is_free(port):
        example = free_port()
        single = ' or, on one machine, leave PORT unset to pick a free one' \
            if nnodes == 1 else ''
        raise ToolError(
            f'{how} is already in use on this machine (by another training run?). Choose '
            f'another port with PORT, e.g. PORT={example} (free now){single}.')
    return port


def torchrun_arguments(nproc: str, script: str, script_args: Sequence[str],
                       env: Mapping[str, str]) -> List[str]:
    """torchrun's command line for ``nproc`` processes here, the launch checked."""
    nnodes = _positive_int(env.get('NNODES') or '1', 'NNODES')
    try:
        node_rank = int(env.get('NODE_RANK') or 0)
    except ValueError:
        node_rank = -1
    if not 0 <= node_rank < nnodes:
        raise ToolError(f'NODE_RANK={env.get("NODE_RANK")!r} must be 0 .. NNODES-1 '
                        f'(NNODES={nnodes}).')
    nproc = check_process_count(nproc)
    port = rendezvous_port(env, nnodes, node_rank)
    return [f'--nnodes={nnodes}', f'--node_rank={node_rank}',
            f'--master_addr={env.get("MASTER_ADDR") or "127.0.0.1"}',
            f'--master_port={port}', f'--nproc_per_node={nproc}', script, *script_args]


def describe_failure(script: str, rank: int, exitcode: int) -> str:
    """One line for the first process that failed: which rank, and how."""
    if exitcode < 0:
        try:
            how = f'was killed by {signal.Signals(-exitcode).name}'
        except ValueError:
            how = f'was killed by signal {-exitcode}'
    else:
        how = f'exited with status {exitcode}'
    return (f'{osp.basename(script)} {how} on rank {rank} (its messages are above); the '
            f'other processes were stopped with it.')


def exit_status(exitcode: int) -> int:
    """The shell's status for a process that ended with ``exitcode`` (128 + N: signal N)."""
    return exitcode if exitcode > 0 else 128 - exitcode if exitcode < 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    nproc, script, script_args = argv[0], argv[1], argv[2:]
    try:
        arguments = torchrun_arguments(nproc, script, script_args, os.environ)
    except ToolError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    try:
        run(parse_args(arguments))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f'error: {describe_failure(script, rank, failure.exitcode)}', file=sys.stderr)
        return exit_status(failure.exitcode)
    except SignalException as e:  # SIGINT or SIGTERM to this launcher; torchrun stopped all
        print(f'error: stopped by {e.sigval.name}; all processes were stopped.',
              file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == '__main__':
    sys.exit(main())
