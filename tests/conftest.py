"""Test session setup: the local Hub server's endpoint is chosen before anything imports huggingface_hub.

Model factories live in tiny_models.py (importable by subprocesses without this file's side effects).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from hub_fixtures import reserve_hub_endpoint

# huggingface_hub reads HF_ENDPOINT and HF_HOME when first imported: point them at the test server and a
# fresh cache before transformers, peft or hf_lora import it.
reserve_hub_endpoint()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hub_fixtures import *  # noqa: E402, F403  (the fixtures hub_server and hub_repo_id)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("hf_lora").setLevel(logging.INFO)
