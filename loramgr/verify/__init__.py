"""loramgr.verify: injected adapters against a reference merged by other code (diffusers, PEFT, formulas).

The reference never uses loramgr's formats, adapter-file or merge layers (it would share
their bugs): it re-reads each adapter's source file (:mod:`.sources`), merges it into the
base's source torch model with diffusers or the published formulas (:mod:`.reference`,
:mod:`.formulas`), and exports the result like a base (:mod:`.merged`). What the export cannot
hold (more ControlNets, textual-inversion embeddings loaded by diffusers, :mod:`.embeddings`)
is checked on the torch model with diffusers' own pipeline (:mod:`.pipelines`). :func:`verify`
then compares weights, graph outputs and images (:mod:`.compare`) and returns a
:class:`VerifyReport`. docs/verify.md describes the checks and their tolerances.
"""

from .api import verify
from .report import CheckResult, VerifyReport, render_report
from .settings import CHECKS, TOLERANCES, Tolerances, VerifySettings

__all__ = ["CHECKS", "TOLERANCES", "CheckResult", "Tolerances", "VerifyReport", "VerifySettings", "render_report", "verify"]
