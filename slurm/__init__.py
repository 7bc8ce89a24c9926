"""tokensieve.slurm: sbatch templates (package data) and ``tokensieve slurm submit``.

Light on purpose: importing it pulls neither torch nor Lightning (see :mod:`.submit`).
"""

from tokensieve.slurm.submit import Allocation, AllocationError, SubmitError, check_allocation, render_script, submit

__all__ = ["Allocation", "AllocationError", "SubmitError", "check_allocation", "render_script", "submit"]
