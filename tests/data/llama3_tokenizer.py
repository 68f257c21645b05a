"""A small tokenizer shaped like Meta-Llama-3-8B's, for the `chat` template tests.

Byte-level BPE with Llama-3's special tokens added after the base vocabulary (as Meta's ids
128000+ come after the 128,000 BPE tokens), special, so `add_special_tokens=False` never strips
them and `skip_special_tokens` drops them; a post-processor that prepends `<|begin_of_text|>` as
Meta's does; BOS/EOS as the base model's (`<|end_of_text|>` is EOS, answers in the chat format
end with `<|eot_id|>`); no pad and no unk token; and Meta-Llama-3-8B-Instruct's own chat
template, verbatim.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BASE_VOCAB = 320
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>")  # ids BASE_VOCAB + 0..4
BOT, EOT_TEXT, START_HEADER, END_HEADER, EOT = range(BASE_VOCAB, BASE_VOCAB + len(SPECIALS))

# tokenizer_config.json of meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

CORPUS = ["Translate the sentence into French.", "The cat sat on the mat.", "Le chat.",
          "user assistant system", "Give three tips for staying healthy.",
          "Eat a balanced diet and exercise regularly."] * 20


def build_llama3_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == BASE_VOCAB
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BOT)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                 eos_token="<|end_of_text|>")
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    assert [loaded.convert_tokens_to_ids(s) for s in SPECIALS] == list(range(BOT, EOT + 1))
    assert loaded.pad_token_id is None and loaded.unk_token_id is None
    return loaded
