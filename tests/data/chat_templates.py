"""Chat templates as the models ship them, each with a twin that marks its generations
(`{% generation %}`) so transformers can compute the assistant mask to compare against, and a
small sentencepiece-shaped tokenizer (Metaspace BPE, `<unk>`/`<s>`/`</s>` = 0/1/2) for the
`[INST]` templates of Mistral and Llama-2."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.data.llama3_tokenizer import LLAMA3_CHAT_TEMPLATE

# Meta-Llama-3-8B-Instruct's template with the assistant content and its <|eot_id|> marked.
LLAMA3_MARKED = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1's template: [INST] blocks, answers end "</s> ", no system.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and "
    "assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_MARKED = MISTRAL_TEMPLATE.replace(
    "{{ message['content'] + eos_token + ' ' }}",
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ ' ' }}")

# meta-llama/Llama-2-7b-chat-hf's template: the system prompt inside the first [INST] block.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA2_MARKED = LLAMA2_TEMPLATE.replace(
    "{{ ' '  + content.strip() + ' ' + eos_token }}",
    "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}")

TEMPLATES = {  # name -> (template, marked twin, takes a system turn, tokenizer kind)
    "llama3": (LLAMA3_CHAT_TEMPLATE, LLAMA3_MARKED, True, "llama3"),
    "mistral": (MISTRAL_TEMPLATE, MISTRAL_MARKED, False, "sentencepiece"),
    "llama2": (LLAMA2_TEMPLATE, LLAMA2_MARKED, True, "sentencepiece"),
}

CORPUS = ["[INST] Translate the sentence into French. [/INST]", "The cat sat on the mat.",
          "<<SYS>> You are a helpful assistant. <</SYS>>", "Give three tips for staying healthy.",
          "Eat a balanced diet and exercise regularly.", "Le chat est sur le tapis.",
          "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()'-\n"] * 20


def build_sentencepiece_tokenizer(out_dir: str | Path, template: str) -> PreTrainedTokenizerFast:
    """A Metaspace BPE shaped like Llama-2's and Mistral's tokenizer.json, with `template`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("<unk>", "<s>", "</s>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    hf.chat_template = template
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    assert [loaded.convert_tokens_to_ids(s) for s in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    return loaded
