"""Transitional re-export of the modules ``lpmosd.models`` was split into.

New code imports from where things live: :mod:`lpmosd.timestamps`, :mod:`lpmosd.fields` (the
field-validation engine), :mod:`lpmosd.documents`, :mod:`lpmosd.lifecycle` (the state
machine and task operations) and :mod:`lpmosd.api_requests`. This module only keeps branches
written before the split importable; nothing in the tree imports it.
"""

from lpmosd.api_requests import *  # noqa: F403
from lpmosd.documents import *  # noqa: F403
from lpmosd.fields import sanitize_text as sanitize_text
from lpmosd.lifecycle import *  # noqa: F403
from lpmosd.schema import STEP_RE as STEP_RE
from lpmosd.timestamps import *  # noqa: F403
