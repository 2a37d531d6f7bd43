"""What every KFP component wrapper shares."""
from __future__ import annotations

import functools
from typing import Any, Callable

from kfp import dsl

# The container every component runs in (containers/Dockerfile): segflow and its pinned stack
# are installed there, so component bodies are short calls into `segflow` with nothing to
# install at run time. kfp.local's SubprocessRunner ignores it and uses the current environment.
BASE_IMAGE = "ghcr.io/segflow/segflow:0.1.0"

component: Callable[[Callable[..., Any]], Any] = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)
