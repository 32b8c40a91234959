"""Ovis-U1: the composed model and its public API.

The building blocks (each usable alone, and what the ComfyUI nodes call):
``encode_condition`` (prompt + image → LLM hidden states of every CFG branch), ``refine`` (token refiner, once per
prompt), ``encode_context`` (edit source → VAE latent tokens), ``sample`` (flow-matching Euler with CFG → VAE
latent), ``vae_decode`` / ``vae_encode``. ``text_to_image`` and ``edit`` are only these composed; ``understand``
answers questions about images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import fp8, gguf, prompts
from . import attention as attention_kernels
from .checkpoint import MarkFileSlice, ReadTransform, check_directory, load_weights, reading_ahead
from .config import OvisU1Params, load_params
from .inputs import (  # re-exported: these names were defined here first
    MAX_CFG,
    MAX_ENCODE_PIXELS,
    MAX_SIZE,
    MIN_SIZE,
    SIZE_MULTIPLE,
    OvisU1InputError,
    check_cfg,
    check_latent,
    check_max_new_tokens,
    check_pixels,
    check_prompt,
    check_sampling,
    check_seed,
    check_size,
    check_steps,
)
from .inputs import check_answer_fits, check_compute_dtype, check_edit_image, check_finite, check_pil_image
from .truncation import check_truncation
from .llm import TokenSampling, build_llm, condition_states, generate
from .mmdit import MMDiT
from .multimodal import merge_multimodal
from .operations import casts_weights, cast_weights_of, compute_dtype, manual_cast, parse_weight_storage
from .preprocess import (
    condition_image,
    edit_target_size,
    preprocess_image,
    resize_for_edit,
    to_rgb,
    vae_pixel_values,
    white_canvas,
)
from .sampling import pack_latents, sample_condition
from .vae import AutoencoderKL, latent_to_vae, legacy_vae_key, to_uint8_image, vae_to_latent
from .vision import VisualTokenizer, visual_embeddings

MODES = ("t2i", "edit")


@dataclass
class Understanding:
    text: str
    token_ids: list[int]
    warnings: list[str] = field(default_factory=list)  # e.g. what the truncation to multimodal_max_length cut


@dataclass
class Condition:
    """LLM hidden states [1, L, 2·hidden] of every CFG branch a mode needs (official test_txt_to_img.py /
    test_img_edit.py build_inputs, modeling_ovis_u1.py OvisU1.generate_condition)."""

    mode: str
    width: int
    height: int
    branches: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)  # e.g. what the truncation to multimodal_max_length cut


@dataclass
class Refined:
    """Refined text tokens [1, L, H] and pooled vector [1, H] per branch — time-independent (official modeling_yak.py,
    SingleTokenRefiner: its timestep embedder is commented out)."""

    mode: str
    width: int
    height: int
    branches: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EditContext:
    """The edit source as packed VAE latent tokens [1, N, 16] at the edit size, and that resized image."""

    tokens: torch.Tensor
    width: int
    height: int
    image: Image.Image = field(repr=False)


def _device_of(module: nn.Module) -> torch.device:
    """Where a part computes. A memory manager that loads a part only partially (ComfyUI's lowvram path, dynamic VRAM)
    leaves some weights on the offload device and casts them layer by layer; it says where the part runs by setting
    ``execution_device`` on it. Otherwise the part runs where its weights are."""
    device = getattr(module, "execution_device", None)
    return device if device is not None else next(module.parameters()).device


def _with_attention(method):
    """Run a pass of the model on the model's own attention kernel (``self.attention``)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with attention_kernels.using(self.attention):
            return method(self, *args, **kwargs)

    return run


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a part computes in (not its fp8 storage dtype)."""
    return compute_dtype(module)


class VisualGenerator(nn.Module):
    def __init__(self, params: OvisU1Params, operations=nn, mmdit_class: type[MMDiT] = MMDiT):
        super().__init__()
        self.backbone = mmdit_class(params.mmdit, operations=operations)
        self.vae = AutoencoderKL(params.vae, operations=operations)


class OvisU1(nn.Module):
    """The whole model. ``operations``: the layer namespace the parts are built from (default ``torch.nn``; the
    ComfyUI bridge passes ComfyUI's operations, fp8 storage the pack's :class:`ovis_u1.operations.manual_cast`);
    ``encoder_operations``: the namespace of the encoder parts — LLM, visual encoder, visual embedding table — where
    it differs (None: ``operations``; the ComfyUI bridge passes one without ComfyUI's fp8 matmul: see
    :data:`FP8_KEPT_OUT`);
    ``mmdit_class``: the MMDiT's class (a host's subclass that adds its own call convention)."""

    def __init__(self, params: OvisU1Params, tokenizer=None, attention: str = "auto", operations=nn,
                 mmdit_class: type[MMDiT] = MMDiT, encoder_operations=None):
        super().__init__()
        encoder_operations = operations if encoder_operations is None else encoder_operations
        self.params = params
        self.tokenizer = tokenizer
        self.attention = attention_kernels.kernel(attention)
        self.cast_weights = cast_weights_of(encoder_operations)  # reads the visual embedding table outside its forward
        self.llm = build_llm(params.llm_config, attention, encoder_operations)
        self.visual_tokenizer = VisualTokenizer(params.vision, operations=encoder_operations)
        self.vte = encoder_operations.Embedding(params.vision.vocab_size, params.hidden_size)
        self.visual_generator = VisualGenerator(params, operations=operations, mmdit_class=mmdit_class)

    # ----------------------------------------------------------------------------------------------- parts
    @property
    def mmdit(self) -> MMDiT:
        return self.visual_generator.backbone

    @property
    def vae(self) -> AutoencoderKL:
        return self.visual_generator.vae

    def set_attention(self, attention) -> None:
        """The attention kernel of this model's passes: a backend name (``attention.BACKENDS``) or a
        ``attention.Kernel`` (a host's selection); other models keep theirs."""
        self.attention = attention_kernels.kernel(attention)

    # ------------------------------------------------------------------------------------ multimodal input
    def _visual_embeds(self, images: list[Image.Image], num_images: int = 1) -> list[torch.Tensor]:
        """Visual embeddings [n_i, hidden] for each image, all images in one encoder pass (official
        modeling_ovis_u1.py, Aimv2VisualTokenizer.preprocess_image / forward and VisualEmbedding)."""
        device, dtype = _device_of(self.visual_tokenizer), _dtype_of(self.visual_tokenizer)
        pixels, grids = [], []
        for img in images:
            pv, grid = preprocess_image(img, self.params.preprocess, num_images=num_images)
            pixels.append(torch.as_tensor(pv))
            grids.append(torch.as_tensor(grid).reshape(-1, 3))
        pixel_values = torch.cat(pixels).to(device=device, dtype=dtype)
        grid_thws = torch.cat(grids).to(device)
        probs = self.visual_tokenizer(pixel_values, grid_thws)
        embeds = visual_embeddings(probs, self.vte, self.cast_weights)
        counts = [int(g.prod()) // self.params.vision.hidden_stride**2 for g in grids]
        return list(embeds.split(counts))

    def _merge(self, ids: list[int], visual: list[torch.Tensor], notes: list[str] | None = None,
               what: str = "the prompt", images_adjustable: bool = False) -> torch.Tensor:
        """Input embeddings [L, hidden] with the placeholders filled (official modeling_ovis_u1.py,
        OvisU1.merge_multimodal), truncated to the last ``multimodal_max_length`` positions; what the truncation cuts
        is warned about (and appended to ``notes``), an image it would remove completely is an error (``what`` names
        the text input)."""
        found = check_truncation(ids, [len(v) for v in visual], prompts.IMAGE_ATOM_ID,
                                 self.params.multimodal_max_length, what, self.tokenizer.decode, images_adjustable)
        if notes is not None:
            notes.extend(n for n in found if n not in notes)
        device = _device_of(self.llm)
        text = self.llm.get_input_embeddings()(torch.tensor(ids, device=device).clamp(min=0))
        first_indicator_row = self.params.vision.vocab_size - 5

        def indicator(tid: int) -> torch.Tensor:  # the row through the layer's own cast
            row = first_indicator_row + prompts.IMAGE_INDICATOR_IDS.index(tid)
            return self.vte(torch.tensor([row], device=device))

        return merge_multimodal(ids, text, visual, indicator, self.params.multimodal_max_length)

    # ------------------------------------------------------------------------------------- understanding
    @_with_attention
    @torch.inference_mode()
    def understand(
        self,
        images: list[Image.Image] | None,
        question: str,
        max_new_tokens: int = 1024,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token: Callable[[int, int], None] | None = None,
        scores: list[torch.Tensor] | None = None,
        instruction: str | None = None,
    ) -> Understanding:
        """Answer ``question`` about ``images`` (none: a text-only chat). ``instruction`` is an optional system
        prompt, written as the Qwen3 system turn before the question (e.g. "rewrite the prompt in detail"); None or
        empty text gives the official prompt, which has no system turn."""
        check_prompt(question, "question")
        instruction = prompts.check_instruction(instruction)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if do_sample:  # greedy decoding ignores them (the CLI passes temperature 0 for greedy)
            temperature, top_p = check_sampling(temperature, top_p)
        seed = check_seed(seed)
        if isinstance(images, Image.Image):
            images = [images]
        images = [check_pil_image(img, f"image {i + 1}") for i, img in enumerate(images or [])]
        ids = prompts.understanding_ids(self.tokenizer, question, len(images), instruction)
        visual = self._visual_embeds(images) if images else []
        notes: list[str] = []
        what = "the question" if instruction is None else "the instruction and the question"
        embeds = self._merge(ids, visual, notes, what, images_adjustable=True)
        context = llm_context(self.params)
        check_answer_fits(max_new_tokens, embeds.shape[0], context)
        token_ids = generate(
            self.llm, embeds, self.tokenizer.eos_token_id, max_new_tokens,
            TokenSampling(do_sample, temperature, top_p, seed), on_token=on_token, scores=scores,
            context=context,
        )
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Understanding(text=text, token_ids=token_ids, warnings=notes)

    # -------------------------------------------------------------------------------------- generation
    @staticmethod
    def edit_size(image: Image.Image) -> tuple[int, int]:
        """(width, height) of an edit of ``image`` (official test_img_edit.py, pipe_img_edit)."""
        return check_edit_image(check_pil_image(image, "image"), "image")

    @_with_attention
    @torch.inference_mode()
    def encode_condition(
        self,
        prompt: str,
        mode: str = "t2i",
        image: Image.Image | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> Condition:
        """Every CFG branch of ``mode`` in one visual-encoder pass and one LLM pass (official
        test_txt_to_img.py pipe_t2i / test_img_edit.py pipe_img_edit, modeling_ovis_u1.py OvisU1.generate_condition).

        t2i: ``width``/``height`` are the canvas. edit: ``image`` is the source; it is resized to the edit size
        (:func:`edit_source`), unless ``width``/``height`` are given: then it is the source already at that edit size
        (the output of :func:`edit_source`) and is used as it is.
        """
        if mode not in MODES:
            raise OvisU1InputError(f"mode {mode!r} is unknown: use one of {', '.join(MODES)}")
        check_prompt(prompt)
        if mode == "t2i":
            if width is None or height is None:
                raise OvisU1InputError("text-to-image needs width and height")
            if image is not None:
                raise OvisU1InputError("image: text-to-image draws on a blank canvas and uses no image; leave it out, "
                                       "or use mode 'edit' to change the image")
            width, height = check_size(width, height)
            sources = {"canvas": white_canvas(width, height)}
        else:
            if image is None:
                raise OvisU1InputError("edit mode needs an image: connect the image to edit")
            if width is None and height is None:
                source = edit_source(image)
            else:
                source = sized_edit_source(image, width, height)
            width, height = source.size
            sources = {"source": source, "canvas": white_canvas(width, height)}
        names = list(sources)
        visual = self._visual_embeds([condition_image(sources[n], width, height, self.params.preprocess) for n in names])
        visual_by_source = dict(zip(names, visual))
        embeds, notes = [], []
        branch_names = list(prompts.BRANCHES[mode])
        for branch in branch_names:
            ids = prompts.condition_ids(self.tokenizer, mode, branch, prompt)
            embeds.append(self._merge(ids, [visual_by_source[prompts.BRANCHES[mode][branch][1]]], notes))
        states = condition_states(self.llm, embeds)
        return Condition(mode, width, height, {b: s[None] for b, s in zip(branch_names, states)}, warnings=notes)

    @_with_attention
    @torch.inference_mode()
    def refine(self, condition: Condition) -> Refined:
        """Token refiner for every branch; branches of equal length run as one batch."""
        device, dtype = _device_of(self.mmdit), _dtype_of(self.mmdit)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        by_length: dict[int, list[str]] = {}
        for name, txt in condition.branches.items():
            check_finite(txt, f"condition branch {name!r}", "re-encode the condition (NaN/inf came from the LLM)")
            by_length.setdefault(txt.shape[1], []).append(name)
        for names in by_length.values():
            txt = torch.cat([condition.branches[n] for n in names]).to(device=device, dtype=dtype)
            tokens, pooled = self.mmdit.refine(txt)
            for i, n in enumerate(names):
                out[n] = (tokens[i : i + 1], pooled[i : i + 1])
        return Refined(condition.mode, condition.width, condition.height, out)

    @_with_attention
    @torch.inference_mode()
    def encode_context(self, image: Image.Image, seed: int = 42) -> EditContext:
        """Edit source → VAE posterior sample (CPU generator seeded with ``seed``) → scaled, packed tokens."""
        seed = check_seed(seed)
        source = edit_source(image)
        width, height = source.size
        z = sample_edit_latent(self.vae, source, seed)
        tokens = pack_latents(vae_to_latent(z, self.params.vae))
        return EditContext(tokens=tokens, width=width, height=height, image=source)

    @_with_attention
    @torch.inference_mode()
    def sample(
        self,
        refined: Refined,
        width: int | None = None,
        height: int | None = None,
        context: EditContext | None = None,
        steps: int = 50,
        txt_cfg: float = 5.0,
        img_cfg: float = 1.5,
        seed: int = 42,
        timestep_shift: bool | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Flow-matching Euler sampling with CFG → VAE latent [1, 4, H/8, W/8] (unscaled, fp32; official
        modeling_yak.py, YakModel.generate_image / get_schedule / denoise / edit_denoise)."""
        width, height, steps, txt_cfg, img_cfg, seed = check_sample_request(
            refined, context, width, height, steps, txt_cfg, img_cfg, seed
        )
        mmdit = self.mmdit
        latent = sample_condition(
            mmdit, refined.mode, refined.branches, width, height, _device_of(mmdit), _dtype_of(mmdit),
            context=None if context is None else context.tokens, steps=steps, txt_cfg=txt_cfg, img_cfg=img_cfg,
            seed=seed, timestep_shift=timestep_shift, callback=callback,
        )
        return latent_to_vae(latent, self.params.vae)

    # --------------------------------------------------------------------------------------------- VAE
    @_with_attention
    @torch.inference_mode()
    def vae_encode(self, pixels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → VAE latent (posterior sample with a seeded CPU generator, or its mean).

        Images above MAX_ENCODE_PIXELS are refused rather than tiled: the encoder's mid-block attends over the whole
        image, so a tiled encode is not the same latent, and nothing in Ovis-U1 needs more than 4096² pixels."""
        check_pixels(pixels, "pixels", MAX_ENCODE_PIXELS)
        seed = None if seed is None else check_seed(seed)
        vae = self.vae
        mean, logvar = vae.encode(pixels.to(device=_device_of(vae), dtype=_dtype_of(vae)))
        if seed is None:
            return mean.float()
        return vae.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(seed)).float()

    @_with_attention
    @torch.inference_mode()
    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE latent [B, 4, h, w] → images [B, 3, 8h, 8w] in [-1, 1] (clamped)."""
        check_latent(latent, "latent", self.params.vae.latent_channels)
        vae = self.vae
        x = vae.decode(latent.to(device=_device_of(vae), dtype=_dtype_of(vae)))
        return x.float().clamp(-1, 1)

    def decode_to_pil(self, latent: torch.Tensor) -> list[Image.Image]:
        images = to_uint8_image(self.vae_decode(latent)).cpu().numpy()
        return [Image.fromarray(a) for a in images]

    # ------------------------------------------------------------------------------------------ tasks
    def text_to_image(self, prompt: str, width: int = 1024, height: int = 1024, steps: int = 50,
                      txt_cfg: float = 5.0, seed: int = 42, callback=None) -> Image.Image:
        # Every number is checked before the (expensive) text encoding runs.
        check_prompt(prompt)
        width, height = check_size(width, height)
        steps, txt_cfg, seed = check_steps(steps), check_cfg("txt_cfg", txt_cfg), check_seed(seed)
        condition = self.encode_condition(prompt, "t2i", width=width, height=height)
        latent = self.sample(self.refine(condition), width, height, steps=steps, txt_cfg=txt_cfg, seed=seed,
                             callback=callback)
        return self.decode_to_pil(latent)[0]

    def edit(self, image: Image.Image, instruction: str, steps: int = 50, img_cfg: float = 1.5,
             txt_cfg: float = 6.0, seed: int = 42, context_seed: int | None = None, callback=None) -> Image.Image:
        # Every input is checked before the (expensive) text encoding runs.
        check_prompt(instruction, "instruction")
        check_edit_image(check_pil_image(image, "image"), "image")
        steps, seed = check_steps(steps), check_seed(seed)
        txt_cfg, img_cfg = check_cfg("txt_cfg", txt_cfg), check_cfg("img_cfg", img_cfg)
        context_seed = None if context_seed is None else check_seed(context_seed, "context_seed")
        condition = self.encode_condition(instruction, "edit", image=image)
        context = self.encode_context(image, seed=seed if context_seed is None else context_seed)
        latent = self.sample(self.refine(condition), context=context, steps=steps, txt_cfg=txt_cfg,
                             img_cfg=img_cfg, seed=seed, callback=callback)
        return self.decode_to_pil(latent)[0]


def check_sample_request(refined: Refined, context: EditContext | None, width, height, steps, txt_cfg, img_cfg,
                         seed) -> tuple[int, int, int, float, float, int]:
    """The inputs of :meth:`OvisU1.sample` checked (an edit's size is its context's) → (width, height, steps,
    txt_cfg, img_cfg, seed)."""
    if refined.mode == "edit":
        if context is None:
            raise OvisU1InputError(
                "an edit condition needs the edit context: connect 'Ovis-U1 Edit Context Encoder' to context"
            )
        if (context.width, context.height) != (refined.width, refined.height):
            raise OvisU1InputError(
                f"the context is {context.width}×{context.height} but the condition was encoded for "
                f"{refined.width}×{refined.height}: encode both from the same image"
            )
        width, height = context.width, context.height
    elif context is not None:
        raise OvisU1InputError("a text-to-image condition takes no context: disconnect it or encode in edit mode")
    width = refined.width if width is None else width
    height = refined.height if height is None else height
    width, height = check_size(width, height)
    txt_cfg = check_cfg("txt_cfg", txt_cfg)
    if refined.mode == "edit":
        img_cfg = check_cfg("img_cfg", img_cfg)
    steps = check_steps(steps)
    seed = check_seed(seed)
    for name, pair in refined.branches.items():
        for part in pair:
            check_finite(part, f"refined branch {name!r}", "run the refiner again (NaN/inf came from the model)")
    if context is not None:
        check_finite(context.tokens, "context", "encode the edit context again from a finite image")
    return width, height, steps, txt_cfg, img_cfg, seed


def edit_source(image: Image.Image, name: str = "image") -> Image.Image:
    """The image an edit works on: ``image`` checked once and resized once to its edit size, as the official edit
    resizes its input once, before both the LLM condition and the VAE context."""
    check_edit_image(check_pil_image(image, name), name)
    return resize_for_edit(image)


def sized_edit_source(image: Image.Image, width, height, name: str = "image") -> Image.Image:
    """An edit source that is already at its edit size ``width``×``height`` (from :func:`edit_source`)."""
    width, height = check_size(width, height)
    image = check_pil_image(image, name)
    if image.size != (width, height):
        raise OvisU1InputError(
            f"{name} is {image.size[0]}×{image.size[1]} but the edit context is {width}×{height}: connect the "
            "resized image that came with the context (the 'resized_image' of the Edit Context Encoder)"
        )
    return to_rgb(image)


@torch.inference_mode()
def sample_edit_latent(vae: AutoencoderKL, source: Image.Image, seed: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """The raw VAE latent [1, 4, H/8, W/8] (fp32) of an edit source at its edit size: a sample of the posterior
    drawn with a CPU generator seeded with ``seed``, as the official edit encodes its context. Encoded on ``device``
    in ``dtype`` (None: where the VAE computes, in its weights' dtype): a host's VAE device and dtype, whatever part
    of the weights it has moved there."""
    seed = check_seed(seed)
    width, height = source.size
    pixels = vae_pixel_values(source, width, height)
    dtype = dtype or _dtype_of(vae)
    mean, logvar = vae.encode(pixels.to(device=device or _device_of(vae), dtype=dtype), dtype)
    return vae.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(seed)).float()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


QWEN3_CONTEXT = 32768  # transformers' Qwen3Config default max_position_embeddings


def llm_context(params: OvisU1Params) -> int:
    """How many positions the LLM attends over: its config's ``max_position_embeddings``."""
    return int(params.llm_config.get("max_position_embeddings") or QWEN3_CONTEXT)


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


FP8_PARTS = ("llm.", "visual_tokenizer.", "vte.", "visual_generator.backbone.")  # never the VAE

# Matrices kept in the compute dtype under fp8 storage. ComfyUI's fp8 matmul (``--fast``: comfy.ops.fp8_ops, ComfyUI
# 0.33.0 comfy/ops.py fp8_linear) takes every Linear whose weight is stored in float8_e4m3fn and rounds its *input* to
# e4m3 too, clamped to ±448; a layer whose weight is not fp8 takes the plain cast, so a matrix kept here keeps its layer
# out of fp8 compute. Measured with bench/bench_memory.py --sensitivity (the fp8 matmul emulated on the CPU, t2i
# 256², 4 steps, tiny test model): rounding the inputs of the pooled-vector path (txt_in.c_embedder, time_in,
# vector_in) moves the image by about 10 uint8 levels on average where rounding their weights moves it by 2–3, and
# the final linear's by 3.8 against 1.4; with these kept out the --fast t2i deviation drops from 13.1 to 5.9 levels
# (mid-size model: 6.8 to 5.9; README, "Memory and speed"). They run once per prompt or on one vector per step, so fp8
# would only have saved their bytes: 23 M parameters of the real model (0.7 % of what fp8 stores).
# txt_in.input_embedder is kept out for its input rather than a measured cost: it multiplies the LLM's un-normalised
# last-layer input (half of the condition), whose outlier channels can exceed ±448 on real weights; on the random test
# weights nothing reaches the clamp (every Linear input |x| ≤ 15 on the tiny model, the condition ≤ 9 on the mid one).
#
# The encoder parts (LLM, visual encoder, visual embedding table) never take that fp8 matmul: a host builds them from
# a namespace without it (``encoder_operations`` of :func:`load_model`; ComfyUI builds its own text encoders with
# the plain manual cast, comfy/sd1_clip.py), fp8 *storage* stays available to them. Their inputs are what the clamp
# would cut: LLMs of this family carry activation outliers in the thousands (the MLP's down_proj inputs) and the
# visual head multiplies an un-normalised input — the case ``txt_in.input_embedder`` is kept out for (above).
FP8_KEPT_OUT: tuple[str, ...] = tuple(
    f"visual_generator.backbone.{name}.weight"
    for name in ("txt_in.input_embedder", "txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2",
                 "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                 "final_layer.linear")
)


# The LLM's token table keeps the compute dtype under fp8 storage. Every generated token reads it twice: the row of
# the next input, and all of it as the tied LM head. Stored in fp8 it would be converted in full for both at every
# token: ComfyUI's cast Embedding converts its whole weight to look up one row (comfy/ops.py,
# disable_weight_init.Embedding.forward_comfy_cast_weights), and the head's cast converts the whole table — the real
# model's 151936 × 2048, 622 MB in bf16, twice per token. In the compute dtype the lookup and the head convert
# nothing; the table costs its size once more than in fp8 (311 MB of the real model, resident) and the peak of a
# token is lower than with an fp8 table and its converted copy (README, "Memory and speed").
FP8_TOKEN_TABLE = "llm.model.embed_tokens.weight"


def architecture_shapes(params: OvisU1Params) -> dict[str, tuple[int, ...]]:
    """Every stored key of the architecture ``params`` describe, with its shape: the model built with plain torch.nn
    layers on the meta device (nothing allocated). The reference for a checkpoint's keys, whatever namespace the
    loaded model is built from — a lazily built layer (ComfyUI under Dynamic VRAM) declares no weight until it is
    loaded."""
    with torch.device("meta"):
        reference = OvisU1(params)
    return {k: tuple(t.shape) for k, t in reference.state_dict(keep_vars=True).items()}


def fp8_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]] | None = None) -> set[str]:
    """State-dict keys that fp8 storage applies to: the matrices (≥ 2-D weights) of layers that cast their weights
    at use, in the LLM, the visual encoder and embedding table, and the MMDiT. ``shapes``: the architecture's key
    shapes (:func:`architecture_shapes`), needed when the layers are built lazily and hold no weight yet; None reads
    them from the layers.

    Biases, norm weights and free parameters (positional table, cls token) keep the compute dtype: they are a
    negligible share of the bytes and the values most sensitive to rounding. Layers that cannot cast (plain
    torch.nn) are left alone, so fp8 never reaches a layer that would multiply in fp8. The matrices of
    :data:`FP8_KEPT_OUT` keep the compute dtype too (their inputs do not survive ComfyUI's fp8 matmul), and so does
    the LLM's token table (:data:`FP8_TOKEN_TABLE`: read whole at every generated token).
    """
    keys = set()
    for name, module in model.named_modules():
        if not casts_weights(module):
            continue
        key = f"{name}.weight"
        if shapes is not None:
            shape = shapes.get(key)
        else:
            weight = getattr(module, "weight", None)
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        if (shape is not None and len(shape) >= 2 and key.startswith(FP8_PARTS) and key not in FP8_KEPT_OUT
                and key != FP8_TOKEN_TABLE):
            keys.add(key)
    return keys


def _operations_for(weight_dtype: torch.dtype | None, operations, name: str):
    """The namespace ``operations`` (None: ``torch.nn``, the pack's manual cast under fp8 storage), refused where it
    cannot hold fp8 weights."""
    if operations is None:
        return manual_cast if weight_dtype is not None else nn
    if weight_dtype is not None and operations is nn:
        raise OvisU1InputError(
            f"weight_dtype {weight_dtype} needs layers that cast their weights (torch.nn layers cannot compute "
            f"with fp8 weights): leave {name} unset (the pack's manual cast is used) or pass a manual-cast one"
        )
    return operations


def load_model(
    path: str | Path,
    device=None,
    dtype: torch.dtype | None = None,
    attention: str = "auto",
    operations=None,
    weight_dtype: torch.dtype | str | None = None,
    mmdit_class: type[MMDiT] = MMDiT,
    mark_file_slice: MarkFileSlice | None = None,
    encoder_operations=None,
) -> OvisU1:
    """Load an Ovis-U1 checkpoint folder (Hugging Face layout). The VAE is kept in fp32 (the official decode runs
    in fp32 on CUDA); everything else computes in ``dtype`` (default bf16 where supported, else fp32).

    ``weight_dtype`` (None/"default", torch.float8_e4m3fn/"fp8_e4m3fn", torch.float8_e5m2/"fp8_e5m2",
    "fp8_e4m3fn_scaled") stores the weight matrices of the LLM, the visual encoder and the MMDiT in that dtype (see
    :func:`fp8_keys`; the _scaled one in e4m3fn with a scale per matrix made from the checkpoint's weights, see
    :mod:`ovis_u1.fp8`); compute stays in ``dtype``. ``operations`` is the layer namespace (default ``torch.nn``,
    or the pack's manual cast when ``weight_dtype`` is set); ``encoder_operations`` the LLM's, visual encoder's and
    visual embedding table's where it differs (None: ``operations``; see :class:`OvisU1`). ``mark_file_slice`` is
    handed to :func:`ovis_u1.checkpoint.load_weights`. A folder whose weights are a GGUF file (``python -m ovis_u1
    quantize``) loads into layers that dequantize them (:mod:`ovis_u1.gguf`); ``weight_dtype`` stays default there.
    """
    storage = parse_weight_storage(weight_dtype)
    weight_dtype = storage.dtype
    operations = _operations_for(weight_dtype, operations, "operations")
    if encoder_operations is not None:
        encoder_operations = _operations_for(weight_dtype, encoder_operations, "encoder_operations")
    dtype = check_compute_dtype(dtype)
    directory = check_directory(path)
    gguf_path = gguf.gguf_file(directory)
    if gguf_path is not None:  # the weights of the folder are quantized already: layers that dequantize them
        if weight_dtype is not None:
            raise OvisU1InputError(f"{gguf_path.name} holds quantized weights: leave weight_dtype at default")
        operations = gguf.gguf_operations(manual_cast if operations is nn else operations)
        encoder_operations = None if encoder_operations is None else gguf.gguf_operations(encoder_operations)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    params = load_params(directory)
    tokenizer = prompts.load_tokenizer(directory)
    attention_kernels.kernel(attention)  # an unusable choice fails before anything is read
    with reading_ahead(directory):  # the disk reads while the model is built
        with torch.device("meta"):
            model = OvisU1(params, tokenizer=tokenizer, attention=attention, operations=operations,
                           mmdit_class=mmdit_class, encoder_operations=encoder_operations)
        shapes = architecture_shapes(params)
        stored_in_fp8 = fp8_keys(model, shapes) if weight_dtype is not None else set()

        def dtype_for(key: str, stored: torch.dtype) -> torch.dtype:
            if key.startswith("visual_generator.vae."):
                return torch.float32
            if key in stored_in_fp8:  # a scaled matrix is read in fp32 (every value of a float file exactly)
                return torch.float32 if storage.scaled else weight_dtype
            return dtype

        # Each scaled matrix is scaled as soon as it is read, on the CPU (the scale math is the CPU's, whatever the
        # device), and only its fp8 entries go to the device: one matrix is ever held wide, not the whole model.
        scale = ReadTransform(frozenset(stored_in_fp8), fp8.scaled_entries) if storage.scaled else None
        if gguf_path is not None:
            gguf.load_gguf_weights(model, gguf_path, device, dtype_for, shapes)
            shapes = {k: v for k, v in shapes.items() if k.startswith(gguf.VAE_PREFIX)}  # the safetensors beside
        load_weights(model, directory, device, dtype_for, rename=legacy_vae_key, expected=shapes,
                     mark_file_slice=mark_file_slice, transform=scale)
    for module in model.modules():  # fp8 tables give their rows in the compute dtype
        if isinstance(module, manual_cast.Embedding):
            module.compute_dtype = dtype
    model.eval()
    model.source = str(directory)
    model.weight_dtype = weight_dtype
    model.weight_storage = storage
    return model
