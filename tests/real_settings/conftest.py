"""Tiny randomly initialised models of each architecture class of the paper's five settings, saved as
diffusers folders (save_pretrained) so that train(cfg) / evaluate(cfg) load them as they would the real ones:

    pixel_class      UNet2DModel with class labels (num_class_embeds), pixel space        (~ DDPM CIFAR-10 + CFG)
    latent_kl        UNet2DModel on 4-channel latents + AutoencoderKL f2                   (~ LDM-8 church)
    latent_vq_class  cross-attention UNet2DConditionModel + VQModel f2 + class_embedder    (~ LDM-4 cin256-v2)
    text_kl          cross-attention UNet2DConditionModel + AutoencoderKL + CLIP text model (~ Stable Diffusion)

Latents are 8x8 and the autoencoders downsample by 2, so decoded images are 16x16 (the digits backend's size).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel
from safetensors.torch import save_file

from tests.conftest import make_tiny_text_unet, make_tiny_unet

NUM_CLASSES = 4  # + the "null" class NUM_CLASSES for classifier-free guidance


def tiny_kl_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()


def tiny_vq_vae(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=3,
                   num_vq_embeddings=16, vq_embed_dim=3, norm_num_groups=4, sample_size=16).eval()


def tiny_class_cross_attn_unet(seed: int = 0) -> UNet2DConditionModel:
    """cin256's structure: the class embedding is the one-token cross-attention context (D = 6)."""
    return make_tiny_text_unet(seed=seed, channels=3, cross_attention_dim=6)


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of single byte-level characters only (GPT-2's byte-to-unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in codes:
        vocab[chr(code)] = len(vocab)
        vocab[chr(code) + "</w>"] = len(vocab)
    return vocab


def save_tiny_text_encoder(root: Path, max_length: int = 8, hidden: int = 6) -> None:
    """A 1-layer CLIPTextModel (hidden 6 = the UNet's cross_attention_dim) and its tokenizer."""
    transformers = pytest.importorskip("transformers", reason="the text-to-image setting needs transformers")
    vocab = _byte_level_vocab()
    raw = root / "tokenizer_raw"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(vocab_file=str(raw / "vocab.json"), merges_file=str(raw / "merges.txt"),
                                           model_max_length=max_length)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=12,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1)
    transformers.CLIPTextModel(config).eval().save_pretrained(root / "text_encoder")


def save_model(root: Path, unet, vae=None, class_table: torch.Tensor | None = None) -> Path:
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False).save_pretrained(
        root / "scheduler")
    if vae is not None:
        vae.save_pretrained(root / "vae")
    if class_table is not None:
        (root / "class_embedder").mkdir()
        save_file({"weight": class_table.contiguous()}, str(root / "class_embedder" / "embeddings.safetensors"))
    return root


@pytest.fixture(scope="session")
def pixel_class_dir(tmp_path_factory) -> Path:
    unet: UNet2DModel = make_tiny_unet(num_class_embeds=NUM_CLASSES + 1, channels=3)
    return save_model(tmp_path_factory.mktemp("pixel_class"), unet)


@pytest.fixture(scope="session")
def latent_kl_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("latent_kl"), make_tiny_unet(channels=4), tiny_kl_vae())


@pytest.fixture(scope="session")
def latent_vq_class_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    table = torch.randn(NUM_CLASSES + 1, 6)
    return save_model(tmp_path_factory.mktemp("latent_vq_class"), tiny_class_cross_attn_unet(), tiny_vq_vae(), table)


@pytest.fixture(scope="session")
def text_kl_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text_kl")
    save_tiny_text_encoder(root)
    return save_model(root, make_tiny_text_unet(channels=4), tiny_kl_vae())


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """A COCO-captions-shaped JSON: two captions of image 1 (the first is used), one each of images 2 and 3."""
    path = tmp_path_factory.mktemp("coco") / "captions_val2014.json"
    annotations = [{"image_id": 1, "id": 10, "caption": "A red car on a street."},
                   {"image_id": 1, "id": 11, "caption": "a second caption of image 1"},
                   {"image_id": 2, "id": 12, "caption": "Two dogs play in the snow."},
                   {"image_id": 3, "id": 13, "caption": "A bowl of fruit."}]
    path.write_text(json.dumps({"annotations": annotations}))
    return path
