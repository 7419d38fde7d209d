"""SD3's text conditioning vs ``StableDiffusion3Pipeline.encode_prompt``.

Tiny random CLIP-L / CLIP-G (``CLIPTextModelWithProjection``) and T5 encoders
saved with ``save_pretrained`` and loaded through our converters; the same
token ids on both sides; the pipeline's embeddings and pooled vectors must
come out of ``sd3_conditioning``.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import torch_refs  # noqa: E402

from leapalign_jax import tokenizers  # noqa: E402
from leapalign_jax.convert import load_clip, load_t5  # noqa: E402
from leapalign_jax.models.sd3_text import sd3_conditioning  # noqa: E402

pytestmark = pytest.mark.torch

PROMPTS = ["a red digit seven on the left", "a blue four at the top"]
T5_LEN, T5_WIDTH = 12, 96  # CLIP states: 32 + 48 = 80, padded to 96


def clip_with_projection(hidden, layers, act, projection, seed):
  return torch_refs.randomize(
    transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
      )
    ),
    seed,
  )


@pytest.fixture(scope="module")
def components(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd3_text")
  tokenizers.train_t5_tokenizer(list(PROMPTS) * 4, str(root / "t5tok"), 64)
  t5_tok = tokenizers.load_t5_tokenizer(str(root / "t5tok"))
  clip_tok = tokenizers.load_clip_tokenizer()
  clip_l = clip_with_projection(32, 2, "quick_gelu", 16, 1)
  clip_g = clip_with_projection(48, 3, "gelu", 24, 2)
  t5 = torch_refs.randomize(
    transformers.T5EncoderModel(
      transformers.T5Config(
        vocab_size=128,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=48,
        num_layers=1,
        num_heads=5,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
      )
    ),
    3,
  )
  for name, model in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
    model.save_pretrained(root / name, safe_serialization=True)
  transformer = diffusers.SD3Transformer2DModel(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
    caption_projection_dim=16,
    pooled_projection_dim=40,
    out_channels=4,
    pos_embed_max_size=8,
  )
  pipe = diffusers.StableDiffusion3Pipeline(
    transformer=transformer,
    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    vae=diffusers.AutoencoderKL(
      block_out_channels=(8,),
      latent_channels=4,
      norm_num_groups=4,
      down_block_types=("DownEncoderBlock2D",),
      up_block_types=("UpDecoderBlock2D",),
    ),
    text_encoder=clip_l,
    tokenizer=clip_tok,
    text_encoder_2=clip_g,
    tokenizer_2=clip_tok,
    text_encoder_3=t5,
    tokenizer_3=t5_tok,
  )
  ids_clip = tokenizers.tokenize_clip(clip_tok, PROMPTS, 77)
  ids_t5 = tokenizers.tokenize_t5(t5_tok, PROMPTS, T5_LEN)
  return root, pipe, ids_clip, ids_t5


def ours(root, ids_clip, ids_t5, with_t5=True):
  _, clip_l = load_clip(str(root / "clip_l"), towers=("text",))
  _, clip_g = load_clip(str(root / "clip_g"), towers=("text",))
  t5 = load_t5(str(root / "t5"))[1] if with_t5 else None
  return sd3_conditioning(
    clip_l,
    clip_g,
    t5,
    jnp.asarray(ids_clip),
    jnp.asarray(ids_clip),
    jnp.asarray(ids_t5),
    t5_width=T5_WIDTH,
  )


def test_matches_the_pipeline(components):
  root, pipe, ids_clip, ids_t5 = components
  context, pooled = ours(root, ids_clip, ids_t5)
  with torch.no_grad():
    ref, _, ref_pooled, _ = pipe.encode_prompt(
      PROMPTS,
      PROMPTS,
      PROMPTS,
      do_classifier_free_guidance=False,
      max_sequence_length=T5_LEN,
    )
  assert context.shape == (2, 77 + T5_LEN, T5_WIDTH)
  np.testing.assert_allclose(context, ref.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, ref_pooled.numpy(), rtol=1e-5, atol=1e-5)


def test_without_t5_its_part_is_zeros(components):
  root, pipe, ids_clip, ids_t5 = components
  context, _ = ours(root, ids_clip, ids_t5, with_t5=False)
  np.testing.assert_array_equal(context[:, 77:], 0.0)
  full, _ = ours(root, ids_clip, ids_t5)
  np.testing.assert_array_equal(context[:, :77], full[:, :77])


def test_penultimate_states_are_transformers_hidden_states(components):
  root, _, ids_clip, _ = components
  model = transformers.CLIPTextModelWithProjection.from_pretrained(
    str(root / "clip_g")
  ).eval()
  with torch.no_grad():
    ref = model(
      torch.from_numpy(np.asarray(ids_clip, np.int64)),
      output_hidden_states=True,
    ).hidden_states[-2]
  _, clip_g = load_clip(str(root / "clip_g"), towers=("text",))
  _, states = clip_g.encode_text_penultimate(jnp.asarray(ids_clip))
  np.testing.assert_allclose(states, ref.numpy(), rtol=1e-5, atol=1e-5)
