"""De-quantize the SmolLM2 GGUF once into a ``save_pretrained`` folder (float32 safetensors and the tokenizer), so
that the many processes of a parallel sweep load it in a second without ``gguf`` (the GGUF's de-quantization
costs each process ~10 s of CPU).  The weights are the de-quantized ones the GGUF path gives, bit for bit
(checked: logits of a chat-templated prompt equal, the tokenizer's chat template and ids equal).

    python benchmarks/smollm_folder.py GGUF_DIR SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR
    python -m sdsopt.lab --task smollm_math --model-dir OUT_DIR ...        # then without --gguf-file
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name, dst = argv or sys.argv[1:]
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # (the weights are de-quantized float32: nothing of the GGUF's format is left)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    again = AutoTokenizer.from_pretrained(dst)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                     tokenize=False)
    same_tok = prompt == again.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        same = torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)(ids).logits)
    print(f"{dst}: written in {time.time() - t0:.0f} s; chat template equal {same_tok}, logits equal {same}")
    if not (same and same_tok):
        raise SystemExit("the folder does not reproduce the GGUF model")


if __name__ == "__main__":
    main()
