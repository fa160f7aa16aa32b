"""Training machinery for the toolboxes' Runner."""
from .optimizers import MergedGroupsOptimWrapperConstructor, merge_param_groups

__all__ = ['MergedGroupsOptimWrapperConstructor', 'merge_param_groups']
