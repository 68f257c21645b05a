"""Generation with `data.template=chat` stops where training ended answers: at Llama-3's
`<|eot_id|>`, which a base model's tokenizer does not call EOS.

A tiny random Llama over a Llama-3-shaped tokenizer is made to emit `<|eot_id|>` mid-answer:
its output row for `<|eot_id|>` becomes the row of the token greedy decoding chose at step K,
scaled 1% up, so at step K `<|eot_id|>` wins and elsewhere nothing changes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from phased_jax.cli import main as cli_main
from phased_jax.data.templates import encode_prompt
from phased_jax.generate.decode import generate_ids
from tests.data.llama3_tokenizer import BOT, EOT, EOT_TEXT, build_llama3_tokenizer

from .conftest import load_hf, save_tiny_hf

VOCAB, NEW = 336, 16
ASK = {"instruction": "Give three tips for staying healthy.", "input": ""}


def _greedy(model, params, prompt, stops):
    return generate_ids(model, params, [prompt], eos_token_ids=stops, max_new_tokens=NEW,
                        max_length=128, batch_size=1, keep_eos=True)[0]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(HF dir with the tokenizer, prompt ids, greedy answer before the edit, step K)."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("llama3_chat")
    tok = build_llama3_tokenizer(root / "tok")
    prompt = encode_prompt(ASK["instruction"], "", "chat", tok)
    save_tiny_hf("llama", root / "base", vocab_size=VOCAB)
    before = _greedy(*load_hf(root / "base"), prompt, [])
    # the first step past 2 whose token is new to the answer (so never argmax before) and not
    # a special token
    k = next(i for i in range(2, NEW) if before[i] not in before[:i] and before[i] < BOT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    with torch.no_grad():
        logit = hf(torch.tensor([prompt + before[:k]])).logits[0, -1, before[k]].item()
        w = hf.lm_head.weight
        w[EOT] = w[before[k]] * (1.01 if logit > 0 else 0.99)
    hf.save_pretrained(root / "chat")
    tok.save_pretrained(root / "chat")
    return root / "chat", prompt, before, k


def test_answers_stop_at_eot(chat_model, tmp_path):
    import transformers

    path, prompt, before, k = chat_model
    model, params = load_hf(path)
    edited = _greedy(model, params, prompt, [])
    assert edited[:k + 1] == [*before[:k], EOT]  # the model now ends its answer at step K
    # EOS alone (what generation stopped at before) runs past <|eot_id|>
    assert len(_greedy(model, params, prompt, [EOT_TEXT])) > k + 1

    src, out = tmp_path / "ask.jsonl", tmp_path / "answers.jsonl"
    src.write_text(json.dumps({**ASK, "id": "a"}) + "\n")
    rc = cli_main(["generate", "--hf", str(path), "--input", str(src), "--output", str(out),
                   "--max-new-tokens", str(NEW), "--max-length", "128", "--batch-size", "1",
                   "--config.model.dtype=float32", "--config.data.template=chat"])
    assert rc == 0
    answer = json.loads(out.read_text())["output"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert answer == tok.decode(before[:k], skip_special_tokens=True)
    assert np.all(np.asarray(before[:k]) < BOT)  # a text answer, cut exactly at <|eot_id|>
