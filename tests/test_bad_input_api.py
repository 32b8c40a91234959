"""Bad input through the library API, third round (issue 23, items 8 and 9): a loader's model name that is not one
entry of a model folder, a non-float compute dtype, a model folder this process may not open and a ``max_new_tokens``
beyond the LLM's context. Each is the pack's own error naming the input and the fix — never a raw RuntimeError or
PermissionError, never a KV cache larger than the model's context — and afterwards the same loaded model is still in
the state that rendered the golden image (tests/model_state.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import ovis_u1
from ovis_u1 import OvisU1InputError, llm
from ovis_u1.checkpoint import is_folder_name, model_dir_named
from ovis_u1.model import llm_context
from tests.golden import CHECKPOINT, requires_golden
from tests.pack import ROOT

pytestmark = requires_golden

# The loaded model and the golden re-check after every case of the first round; the second round's error check.
from tests.test_bad_input_checkpoint import golden_state, model, still_golden  # noqa: E402, F401
from tests.test_bad_input_more import error  # noqa: E402


# ------------------------------------------------------------------------------------- item 8: model names
@pytest.fixture
def roots(tmp_path):
    """A model root with a checkpoint folder, a link to an outside checkpoint (an entry: listed), a link to an
    outside folder, a non-checkpoint folder; and a checkpoint outside the root."""
    root, outside = tmp_path / "models" / "ovis_u1", tmp_path / "outside"
    root.mkdir(parents=True)
    for name in ("ckpt", "other"):
        (outside / name).mkdir(parents=True)
        shutil.copy(CHECKPOINT / "config.json", outside / name / "config.json")
    shutil.copytree(outside / "ckpt", root / "Ovis-U1-3B")
    (root / "linked").symlink_to(outside / "other", target_is_directory=True)
    (root / "shared").symlink_to(outside, target_is_directory=True)
    (root / "broken").mkdir()
    return root, outside


def test_a_listed_name_is_its_folder(roots):
    root, outside = roots
    assert model_dir_named("Ovis-U1-3B", [root]) == root / "Ovis-U1-3B"
    assert model_dir_named("linked", [root]) == root / "linked"  # followed, as ComfyUI follows links it lists
    assert model_dir_named("broken", [root]) == root / "broken"  # loading it says what is wrong with it
    assert model_dir_named("missing", [root]) is None


@pytest.mark.parametrize("name", ["/abs", "../../outside/ckpt", "Ovis-U1-3B/../../outside/ckpt", "shared/ckpt",
                                  "..", ".", "", "a\\..\\b", "C:ckpt", "x\0y", None, 3])
def test_no_other_name_reaches_the_disk(roots, monkeypatch, name):
    root, outside = roots
    if name == "/abs":
        name = str(outside / "ckpt")
    looked = []
    for attr in ("is_dir", "is_file", "iterdir", "read_text"):
        real = getattr(Path, attr)
        monkeypatch.setattr(Path, attr, lambda self, *a, _real=real, **k: looked.append(self) or _real(self, *a, **k))
    assert not is_folder_name(name)
    assert model_dir_named(name, [root]) is None
    assert looked == [], f"{name!r}: looked at {looked}"


# ---------------------------------------------------------------------------------- item 9: compute dtype
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn, "bf16"])
def test_a_dtype_it_cannot_compute_in_is_named(dtype):
    message = error(OvisU1InputError, lambda: ovis_u1.load_model(CHECKPOINT, device="cpu", dtype=dtype),
                    f"dtype {dtype!r}", "torch.bfloat16, torch.float16 or torch.float32")
    assert ("weight_dtype" in message) == (dtype == torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------- item 9: permissions
PROBE = """
import ctypes, os, sys
if os.geteuid() == 0:  # drop CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2): root then meets file modes too
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.capget(header, data) == 0, os.strerror(ctypes.get_errno())
    for word in (0, 1):
        data[word] &= ~0b110
    assert libc.capset(header, data) == 0, os.strerror(ctypes.get_errno())
sys.path.insert(0, sys.argv[1])
import torch, ovis_u1
for path in sys.argv[3:]:
    try:
        ovis_u1.load_model(path, device="cpu", dtype=torch.float32)
        print("LOADED", path)
    except Exception as e:
        print(type(e).__name__, str(e).replace(chr(10), " "))
print("LISTED", [str(p) for p in ovis_u1.find_model_dirs([sys.argv[2]])])
"""


def test_a_folder_this_process_may_not_open_is_named():
    """Real permissions, not an injected error: the folders are chmod'ed, and the loading runs in a child process
    that, when the tests run as root, first gives up the two capabilities that let root ignore file modes
    (capabilities(7): CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that chmod denies it as it denies any user."""
    base = Path(tempfile.mkdtemp(prefix="ovis_u1_perm_"))
    try:
        base.chmod(0o755)
        root, locked = base / "root", base / "locked"
        for folder in (root / "no_access", root / "not_enterable", locked / "ckpt", root / "readable"):
            shutil.copytree(CHECKPOINT, folder)
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "no_access").chmod(0o000)
        (root / "not_enterable").chmod(0o644)
        locked.chmod(0o000)
        targets = [root / "no_access", root / "not_enterable", locked / "ckpt", root / "readable"]
        out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), str(root), *map(str, targets)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.strip().splitlines()
        for target, line in zip(targets[:3], lines):
            assert line.startswith("CheckpointError ") and str(target) in line and "permission denied" in line \
                and "chmod a+rx" in line, line
        assert lines[3] == f"LOADED {root / 'readable'}", lines[3]
        assert lines[4] == f"LISTED {[str(root / 'readable')]}", lines[4]  # the others quietly not listed
    finally:
        for p in (base / "locked", base / "root" / "no_access", base / "root" / "not_enterable"):
            p.chmod(0o755)
        shutil.rmtree(base)


# ---------------------------------------------------------------------------- item 9: max_new_tokens
def test_max_new_tokens_beyond_the_context_is_named(model, monkeypatch):
    made = []
    monkeypatch.setattr(llm, "KVCache", lambda *a, **k: made.append(k) or pytest.fail("a KV cache was made"))
    context = llm_context(model.params)
    message = error(OvisU1InputError, lambda: model.understand(None, "hi", max_new_tokens=10**9),
                    "max_new_tokens 1000000000", f"of its {context} positions", "max_position_embeddings",
                    "set max_new_tokens to at most")
    room = int(message.split("at most ")[1].split(" ")[0])
    assert 0 < room < context and made == []


def test_the_kv_cache_never_grows_past_the_context(model, monkeypatch):
    """generate itself, asked for far more than the context, stops at the context: the cache it allocates (and any
    growth of it) holds at most ``context`` positions."""
    sizes = []
    real = llm.KVCache._reserve

    def reserve(self, k, needed):
        real(self, k, needed)
        sizes.append(self.buffer.shape[4])

    monkeypatch.setattr(llm.KVCache, "_reserve", reserve)
    embeds = model.llm.get_input_embeddings()(torch.tensor([1, 2, 3, 4]))
    context = 9
    tokens = llm.generate(model.llm, embeds, None, 10**9, context=context)
    assert len(tokens) == context - 4
    assert max(sizes) <= context, sizes


# --------------------------------------------------------------------------- an image in text-to-image mode
def test_an_image_given_to_text_to_image_is_not_ignored(model):
    error(OvisU1InputError, lambda: model.encode_condition("a cat", "t2i", image=Image.new("RGB", (64, 64)), width=64,
                                                           height=64), "image: text-to-image", "mode 'edit'")
