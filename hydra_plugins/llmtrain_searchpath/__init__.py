"""Makes experiments/ visible to Hydra from any working directory, as the `experiment` group.

hydra_plugins/ has no __init__.py on purpose: Hydra scans it as a namespace package (HYDRA.md 2.5).
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"   # repository root / experiments


class LlmtrainExperiments(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="llmtrain-experiments", path=f"file://{EXPERIMENTS}")
