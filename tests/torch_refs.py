"""Tiny torch reference models shared by the parity tests and benchmarks.

torch, diffusers and transformers are imported by the callers (tests skip
without them); nothing here is used at training or sampling time.
"""

import diffusers
import torch
import transformers

from leapalign_jax import tokenizers


def randomize(model, seed):
  """Random weights everywhere (norm scales near 1), eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def tiny_flux_pipeline(
  root, prompts, size=32, hidden=32, heads=2, layers=1, single_layers=1
):
  """A tiny random ``FluxPipeline`` saved under ``root/pipe``.

  Components: FLUX transformer (guidance-distilled), a 4x Flux-style
  autoencoder with 16 latent channels, CLIP-L-like text encoder with the real
  CLIP vocabulary, a tiny T5 with a sentencepiece vocabulary trained on
  ``prompts``, and the FLUX.1-dev scheduler config.

  Returns:
    ``(path, pipe)``.
  """
  tok2_dir = str(root / "_t5tok")
  tokenizers.train_t5_tokenizer(list(prompts) * 4, tok2_dir, vocab_size=64)
  tok2 = tokenizers.load_t5_tokenizer(tok2_dir)
  tok = tokenizers.load_clip_tokenizer()
  clip = randomize(
    transformers.CLIPTextModel(
      transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
      )
    ),
    1,
  )
  t5 = randomize(
    transformers.T5EncoderModel(
      transformers.T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
      )
    ),
    2,
  )
  head_dim = hidden // heads
  transformer = randomize(
    diffusers.FluxTransformer2DModel(
      patch_size=1,
      in_channels=64,
      num_layers=layers,
      num_single_layers=single_layers,
      attention_head_dim=head_dim,
      num_attention_heads=heads,
      joint_attention_dim=32,
      pooled_projection_dim=32,
      guidance_embeds=True,
      axes_dims_rope=(
        head_dim - 2 * (head_dim // 4),
        head_dim // 4,
        head_dim // 4,
      ),
    ),
    3,
  )
  vae = randomize(
    diffusers.AutoencoderKL(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3,
      block_out_channels=(8, 16, 16),
      layers_per_block=1,
      latent_channels=16,
      norm_num_groups=4,
      use_quant_conv=False,
      use_post_quant_conv=False,
      scaling_factor=1.5,
      shift_factor=0.1,
      sample_size=size,
    ),
    4,
  )
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    shift=3.0,
    use_dynamic_shifting=True,
  )
  pipe = diffusers.FluxPipeline(
    scheduler=scheduler,
    vae=vae,
    text_encoder=clip,
    tokenizer=tok,
    text_encoder_2=t5,
    tokenizer_2=tok2,
    transformer=transformer,
  )
  pipe.save_pretrained(root / "pipe")
  return str(root / "pipe"), pipe
