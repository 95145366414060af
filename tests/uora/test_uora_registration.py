"""`import uora` extends PEFT's closed PeftType enum once and registers the method (reload-safe)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import uora
from uora._registry import extend_peft_type


def test_peft_type_member_behaves_like_a_builtin_member():
    member = PeftType.UORA
    assert member is PeftType("UORA") is PeftType["UORA"]
    assert member == "UORA" and member.value == "UORA" and member.name == "UORA"
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert member in list(PeftType)
    assert list(PeftType).count(member) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is uora.UoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is uora.UoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "uora_lambda_"
    # the JSON form PEFT writes into adapter_config.json resolves back to UoraConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING[json.loads(json.dumps(member))] is uora.UoraConfig


def test_extension_is_idempotent():
    n_members = len(PeftType)
    assert extend_peft_type("UORA") is PeftType.UORA
    assert extend_peft_type("UORA") is PeftType.UORA
    assert len(PeftType) == n_members


def test_extension_refuses_a_conflicting_value():
    with pytest.raises(ValueError, match="already has a member 'LORA'"):
        extend_peft_type("LORA", "SOMETHING_ELSE")


RELOAD_SCRIPT = """
import importlib, sys
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
n_before_import = len(PeftType)
import uora
import uora  # noqa: F811  (a second import is a no-op)
assert len(PeftType) == n_before_import + 1
before = uora.UoraConfig(r=4, target_modules=["q_proj"])
n_members = len(PeftType)
for name in ("uora._registry", "uora.config", "uora.layer", "uora.model", "uora.reinit", "uora.callbacks"):
    importlib.reload(sys.modules[name])
reloaded = importlib.reload(uora)
assert len(PeftType) == n_members, len(PeftType)
assert reloaded.UORA_PEFT_TYPE is PeftType.UORA
assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.UORA] is reloaded.UoraConfig
assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.UORA] is reloaded.UoraModel
after = reloaded.UoraConfig(r=4, target_modules=["q_proj"])
assert after.peft_type is before.peft_type is PeftType.UORA
print("ok")
"""


def test_import_twice_and_reload_keep_one_member_and_point_peft_at_the_new_classes():
    # in a fresh interpreter: reloading swaps the classes, which must not leak into the other tests
    out = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_config_round_trips_through_peft(tmp_path):
    cfg = uora.UoraConfig(r=16, target_modules=["q_proj", "v_proj"], reinit_target="resample", reinit_seed=3)
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "UORA"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is uora.UoraConfig
    assert (loaded.r, loaded.reinit_target, loaded.reinit_seed) == (16, "resample", 3)
    assert loaded.target_modules == {"q_proj", "v_proj"}
