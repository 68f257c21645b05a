"""A small local tokenizer for tests and the demo, so nothing needs a download.

Byte-level BPE trained with the `tokenizers` library, with Llama's special-token ids
(`<unk>`=0, `<s>`=1, `</s>`=2, pad = `<unk>`), saved in Hugging Face format so
`AutoTokenizer.from_pretrained(out_dir)` loads it offline. Its chat template renders the
authors' prompt shape, so the `chat` template path is testable without a real chat model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}User: {{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` (>= 259: 256 bytes + 3 specials) on `texts`."""
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} < {256 + len(SPECIALS)} (bytes + specials)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizer, plain `tokenizer(text)` prepends <s>; the data pipeline always
    # passes add_special_tokens=False and inserts BOS/EOS ids itself.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    assert [hf.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))  # as users will load it (name_or_path set)
