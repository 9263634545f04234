"""Writes a tiny random Llama and real PEFT LoRA adapters for it, for a real vLLM on CPU.

    python make_tiny_model.py OUT_DIR [--base NAME] [--seed N] [--hidden H] [--layers L] [ADAPTER ...]

  OUT_DIR/NAME/                   the base model (default NAME: base); serve it with
                                  `vllm serve OUT_DIR/NAME`: that path is its model name
  OUT_DIR/adapters/ADAPTER/       adapter_config.json + adapter_model.safetensors

Run it once per base model to get several (e.g. `--base base-a`, then `--base base-b --seed 1
--hidden 128 --layers 3`): the bases differ in their weights, and in their shapes if asked (a
base already written is kept, so a rerun only adds adapters), and the adapters of all bases share
OUT_DIR/adapters/, as adapter names share one namespace behind loraplex. Each adapter's `base_model_name_or_path` is
the absolute path of its base, because vLLM's filesystem resolver compares it exactly with the
`--model` string (not `--served-model-name`).

The model: byte-level tokenizer (256 tokens), 2 layers, hidden 256, 4 query and 2 KV heads of 64
(vLLM's CPU attention rejects a head_dim below 64); loraplex's testkit mirrors these dimensions
in `ModelDims::TINY_LLAMA`. `--hidden` (a multiple of 128) and `--layers` change the shape: heads
stay 64 wide (hidden/64 query heads, half as many KV heads), the MLP twice the hidden size. An
adapter made for one shape does not load on another. Adapters: rank 8 on q/k/v/o_proj with random (not zero) B matrices,
seeded by base seed and adapter name, so every adapter changes greedy outputs and the same name
always gets the same weights.
"""

import argparse
import json
import os
import zlib

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging


def tokenizer() -> PreTrainedTokenizerFast:
    # One token per byte: no vocabulary file to ship, and any prompt tokenizes.
    vocab = {(chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"): i for i in range(256)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True)),
        bos_token="<0x01>",
        eos_token="<0x02>",
        unk_token="<0x00>",
        pad_token="<0x00>",
    )
    # /v1/chat/completions needs a template.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    return tok


def write_base(path: str, seed: int, hidden: int, layers: int) -> None:
    if hidden % 128 or hidden <= 0 or layers <= 0:
        raise SystemExit(f"--hidden {hidden} --layers {layers}: want a multiple of 128 and >= 1")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tokenizer().save_pretrained(path)


def write_adapter(base: str, seed: int, name: str, out: str) -> None:
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        # PEFT's default zero-initialises B, which would make every adapter a no-op.
        init_lora_weights=False,
    )
    get_peft_model(model, lora).save_pretrained(out)
    path = os.path.join(out, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--base", default="base", help="directory name of the base model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base model's weights")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (a multiple of 128)")
    ap.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    ap.add_argument("adapters", nargs="*", help="adapter names, e.g. acme/summarizer-lora")
    args = ap.parse_intermixed_args()
    hf_logging.disable_progress_bar()

    out = os.path.abspath(args.out_dir)
    base = os.path.join(out, args.base)
    if not os.path.isfile(os.path.join(base, "config.json")):
        write_base(base, args.seed, args.hidden, args.layers)
    print("base", base)
    for name in args.adapters:
        d = os.path.join(out, "adapters", name)
        write_adapter(base, args.seed, name, d)
        print("adapter", name, d)


if __name__ == "__main__":
    main()
