"""`LLM.chat` is generation from the chat template's text, encoded without a second BOS."""

from __future__ import annotations

from xllm import SamplingParams

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?"},
    ],
]


def test_chat_equals_generate_from_template_text(llm):
    tok = llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    chats = llm.chat(CONVERSATIONS, params, use_tqdm=False)
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    plain = llm.generate(texts, params, use_tqdm=False)
    for chat, gen, text, conv in zip(chats, plain, texts, CONVERSATIONS, strict=True):
        assert chat.prompt == text
        ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert chat.prompt_token_ids == list(ids)
        assert chat.prompt_token_ids.count(tok.bos_token_id) == 1
        assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
        assert chat.outputs[0].text == gen.outputs[0].text


def test_chat_single_conversation(llm):
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    one = llm.chat(CONVERSATIONS[0], params, use_tqdm=False)
    both = llm.chat(CONVERSATIONS, params, use_tqdm=False)
    assert len(one) == 1 and one[0].outputs[0].token_ids == both[0].outputs[0].token_ids
