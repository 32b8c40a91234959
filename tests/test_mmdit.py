"""MMDiT, token refiner and sampler against the official-code goldens (tiny_a t2i / edit) and the full-size layout."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file

from ovis_u1.config import load_params, params_from_dicts
from ovis_u1.math import apply_rope, embed_positions, grid_ids, timestep_embedding
from ovis_u1.mmdit import MMDiT, Prepared
from ovis_u1.refiner import REFINER_DEPTH
from ovis_u1.sampling import (
    denoise,
    flow_schedule,
    guide_edit,
    guide_t2i,
    initial_noise,
    pack_latents,
    unpack_latents,
)
from tests.golden import CHECKPOINT, GOLDEN, assert_golden, case_params, requires_golden, tensors

PREFIX = "visual_generator.backbone."
SCALING_FACTOR = 0.13025  # SDXL VAE scaling factor of the tiny checkpoint's vae_config

pytestmark = requires_golden


@lru_cache(maxsize=None)
def tiny_model() -> MMDiT:
    params = load_params(CHECKPOINT).mmdit
    model = MMDiT(params).eval()
    weights = load_file(str(CHECKPOINT / "model.safetensors"))
    state = {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}
    model.load_state_dict(state, strict=True)
    return model


def prepare_branch(model: MMDiT, txt: torch.Tensor, height: int, width: int, context=None) -> Prepared:
    with torch.no_grad():
        tokens, pooled = model.refine(txt)
        return model.prepare(tokens, pooled, height, width, context)


def edit_size() -> tuple[int, int]:
    _, _, h, w = tensors("edit")["cond.vae_pixel_values"].shape
    return h, w


# ---- t2i ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def t2i_branches() -> tuple[Prepared, Prepared]:
    g, p = tensors("t2i"), case_params("t2i")
    model = tiny_model()
    return tuple(prepare_branch(model, g[f"{b}.txt"], p["height"], p["width"]) for b in ("cond", "no_both"))


@pytest.mark.parametrize("step", range(3))
def test_t2i_step(step):
    g, p = tensors("t2i"), case_params("t2i")
    model = tiny_model()
    cond, uncond = t2i_branches()
    x, t = g[f"step{step}.latent_in"], g[f"step{step}.t_vec"]
    with torch.no_grad():
        pred_c, pred_u = model(x, t, cond), model(x, t, uncond)
    assert_golden(pred_c, g[f"step{step}.pred_cond"], "pred_cond")
    assert_golden(pred_u, g[f"step{step}.pred_uncond"], "pred_uncond")
    guided = guide_t2i(pred_c, pred_u, p["txt_cfg"])
    assert_golden(guided, g[f"step{step}.pred_guided"], "pred_guided")
    timesteps = g["timesteps"].tolist()
    assert_golden(x + (timesteps[step + 1] - timesteps[step]) * guided, g[f"step{step}.latent_out"], "latent_out")


def test_t2i_denoise():
    g, p = tensors("t2i"), case_params("t2i")
    x = pack_latents(g["noise"])
    assert_golden(x, g["step0.latent_in"], "packed noise")
    trace: list[dict] = []
    calls = []
    with torch.no_grad():
        out = denoise(
            tiny_model(),
            x,
            g["timesteps"].tolist(),
            list(t2i_branches()),
            lambda preds: guide_t2i(*preds, p["txt_cfg"]),
            callback=lambda i, n, _x, _x0: calls.append((i, n)),
            trace=trace,
        )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for s, rec in enumerate(trace):
        assert_golden(rec["t_vec"], g[f"step{s}.t_vec"], f"step{s}.t_vec")
        assert_golden(rec["latent_in"], g[f"step{s}.latent_in"], f"step{s}.latent_in")
        assert_golden(rec["preds"][0], g[f"step{s}.pred_cond"], f"step{s}.pred_cond")
        assert_golden(rec["preds"][1], g[f"step{s}.pred_uncond"], f"step{s}.pred_uncond")
        assert_golden(rec["pred"], g[f"step{s}.pred_guided"], f"step{s}.pred_guided")
        assert_golden(rec["latent_out"], g[f"step{s}.latent_out"], f"step{s}.latent_out")
    assert_golden(out, g["final_latent_tokens"], "final_latent_tokens")


def test_t2i_schedule_noise_ids_unpack():
    g, p = tensors("t2i"), case_params("t2i")
    h, w = p["height"], p["width"]
    n = (h // 16) * (w // 16)
    schedule = flow_schedule(p["steps"], n, False)
    assert schedule == g["timesteps"].tolist()
    noise = initial_noise(p["seed"], h, w)
    assert noise.dtype == torch.bfloat16 and torch.equal(noise, g["noise_bf16"])
    assert torch.equal(noise.float(), g["noise"])
    assert torch.equal(grid_ids(h // 16, w // 16, 0), g["img_ids"])
    assert torch.equal(grid_ids(h // 16, w // 16, 1), g["context.ids"])
    tokens = g["final_latent_tokens"]
    assert_golden(unpack_latents(tokens, h, w).float() / SCALING_FACTOR, g["vae_dec_input"], "vae_dec_input")
    assert torch.equal(pack_latents(unpack_latents(tokens, h, w)), tokens)


# ---- edit -----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def edit_branches() -> tuple[Prepared, Prepared, Prepared]:
    g = tensors("edit")
    h, w = edit_size()
    model = tiny_model()
    ctx = g["context.tokens"]
    return (
        prepare_branch(model, g["cond.txt"], h, w, ctx),
        prepare_branch(model, g["no_txt.txt"], h, w, ctx),
        prepare_branch(model, g["no_both.txt"], h, w, None),
    )


def test_edit_context_packing():
    g = tensors("edit")
    h, w = edit_size()
    assert (h, w) == (64, 96)
    sample = g["context.latent_mean"] + g["context.latent_std"] * g["context.sample_eps"]
    packed = pack_latents(sample * SCALING_FACTOR)
    assert_golden(packed, g["context.tokens"], "context.tokens")
    assert torch.equal(grid_ids(h // 16, w // 16, 1), g["context.ids"])
    assert torch.equal(grid_ids(h // 16, w // 16, 0), g["img_ids"])
    noise = initial_noise(case_params("edit")["seed"], h, w)
    assert torch.equal(noise, g["noise_bf16"])


@pytest.mark.parametrize("step", range(3))
def test_edit_step(step):
    g, p = tensors("edit"), case_params("edit")
    model = tiny_model()
    cond, no_txt, no_both = edit_branches()
    assert no_both.context is None and cond.context is not None
    x, t = g[f"step{step}.latent_in"], g[f"step{step}.t_vec"]
    with torch.no_grad():
        pc, pnt, pnb = model(x, t, cond), model(x, t, no_txt), model(x, t, no_both)
    assert_golden(pc, g[f"step{step}.pred_cond"], "pred_cond")
    assert_golden(pnt, g[f"step{step}.pred_no_txt"], "pred_no_txt")
    assert_golden(pnb, g[f"step{step}.pred_no_both"], "pred_no_both")
    guided = guide_edit(pc, pnt, pnb, p["img_cfg"], p["txt_cfg"])
    assert_golden(guided, g[f"step{step}.pred_guided"], "pred_guided")
    timesteps = g["timesteps"].tolist()
    assert_golden(x + (timesteps[step + 1] - timesteps[step]) * guided, g[f"step{step}.latent_out"], "latent_out")


def test_edit_denoise():
    g, p = tensors("edit"), case_params("edit")
    trace: list[dict] = []
    with torch.no_grad():
        out = denoise(
            tiny_model(),
            pack_latents(g["noise"]),
            g["timesteps"].tolist(),
            list(edit_branches()),
            lambda preds: guide_edit(*preds, p["img_cfg"], p["txt_cfg"]),
            trace=trace,
        )
    for s, rec in enumerate(trace):
        for i, name in enumerate(("pred_cond", "pred_no_txt", "pred_no_both")):
            assert_golden(rec["preds"][i], g[f"step{s}.{name}"], f"step{s}.{name}")
        assert_golden(rec["pred"], g[f"step{s}.pred_guided"], f"step{s}.pred_guided")
        assert_golden(rec["latent_out"], g[f"step{s}.latent_out"], f"step{s}.latent_out")
    assert_golden(out, g["final_latent_tokens"], "final_latent_tokens")


# ---- batching, dtypes, schedule -------------------------------------------------------------------------------


def test_batched_branches_match_separate():
    """Branches with equal text length run as one batched forward; the result equals separate forwards."""
    g = tensors("edit")
    h, w = edit_size()
    model = tiny_model()
    ctx = g["context.tokens"]
    # no_txt and no_both share the text length; give both a context so they batch together.
    a = prepare_branch(model, g["no_txt.txt"], h, w, ctx)
    b = prepare_branch(model, g["no_both.txt"], h, w, ctx)
    assert a.batch_key() == b.batch_key()
    timesteps = g["timesteps"].tolist()
    def guide(preds):
        return guide_t2i(preds[0], preds[1], 3.0)

    x = pack_latents(g["noise"])
    batched, separate = [], []
    with torch.no_grad():
        out_b = denoise(model, x, timesteps, [a, b], guide, trace=batched, batch=True)
        out_s = denoise(model, x, timesteps, [a, b], guide, trace=separate, batch=False)
        both = model(torch.cat([x, x]), torch.ones(2), Prepared.cat([a, b]))
    assert both.shape == (2, *x.shape[1:])
    torch.testing.assert_close(both[1:], model(x, torch.ones(1), b), rtol=1e-5, atol=1e-5)
    for rb, rs in zip(batched, separate):
        for pb, ps in zip(rb["preds"], rs["preds"]):
            torch.testing.assert_close(pb, ps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b, out_s, rtol=1e-5, atol=1e-5)


def test_bf16_forward_is_finite():
    g = tensors("edit")
    h, w = edit_size()
    model = MMDiT(tiny_model().params)
    model.load_state_dict(tiny_model().state_dict())
    model = model.to(torch.bfloat16).eval()
    cond = prepare_branch(model, g["cond.txt"].bfloat16(), h, w, g["context.tokens"].bfloat16())
    x = pack_latents(g["noise_bf16"])
    t = torch.full((1,), 0.6666666269302368, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert cond.pe.dtype == torch.float32
    ref = g["step0.pred_cond"]
    with torch.no_grad():
        out0 = model(x, torch.ones(1, dtype=torch.bfloat16), cond).float()
    # Sanity only (not a parity check): the bf16 path lands near the fp32 golden.
    assert (out0 - ref).abs().max() < 0.1 * ref.abs().max()


def test_shifted_schedule():
    for steps, n in ((3, 16), (50, 4096), (28, 1024)):
        ts = flow_schedule(steps, n, True)
        assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
        assert all(a > b for a, b in zip(ts, ts[1:]))
        plain = flow_schedule(steps, n, False)
        assert all(s >= p_ for s, p_ in zip(ts, plain))  # mu > 0 bends the schedule towards noise


def test_schedule_example():
    assert flow_schedule(3, 16, False) == [1.0, 0.6666666269302368, 0.3333333432674408, 0.0]


# ---- math -----------------------------------------------------------------------------------------------------


def test_timestep_embedding_cos_first_and_dtype():
    t = torch.tensor([0.0, 0.5])
    emb = timestep_embedding(t)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert timestep_embedding(t.bfloat16()).dtype == torch.bfloat16


def test_rope_rotates_interleaved_pairs():
    ids = torch.tensor([[[0.0, 2.0, 3.0]]])
    pe = embed_positions(ids, (4, 6, 6), 10000)
    assert pe.shape == (1, 1, 1, 8, 2, 2) and pe.dtype == torch.float32
    q = torch.zeros(1, 1, 1, 16)
    q[..., 4] = 1.0  # first pair of the row axis, ω = 1 → angle 2
    rq, _ = apply_rope(q, q, pe)
    angle = torch.tensor(2.0, dtype=torch.float64)
    assert torch.allclose(rq[0, 0, 0, 4:6].double(), torch.stack([angle.cos(), angle.sin()]), atol=1e-7)
    assert rq[0, 0, 0, :4].abs().max() == 0 and rq[0, 0, 0, 6:].abs().max() == 0


# ---- layout ---------------------------------------------------------------------------------------------------


def test_tiny_state_dict_matches_checkpoint():
    from safetensors import safe_open

    with safe_open(str(CHECKPOINT / "model.safetensors"), "pt") as f:
        expected = {k[len(PREFIX) :]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = MMDiT(load_params(CHECKPOINT).mmdit)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert not list(model.buffers())


def test_full_size_state_dict_on_meta():
    config = json.loads((GOLDEN / "full_size" / "config.json").read_text())
    shapes = json.loads((GOLDEN / "full_size" / "state_dict_shapes.json").read_text())["shapes"]
    expected = {k[len(PREFIX) :]: tuple(v) for k, v in shapes.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = MMDiT(params_from_dicts(config).mmdit)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected
    refiner_blocks = {k.split(".")[3] for k in expected if k.startswith("txt_in.individual_token_refiner.blocks.")}
    assert len(refiner_blocks) == REFINER_DEPTH
    assert not list(model.buffers())
