"""Golden strings: the exact prompt each template renders for fixed message sets."""

import pytest

from chatserve.conversation import TemplateRegistry

SYS_1 = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}]
TURNS_3 = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
           {"role": "assistant", "content": "D"}, {"role": "user", "content": "E"}]

GOLDEN = {
    ("vicuna_v1.1", "sys"): "SYS USER: Hi ASSISTANT:",
    ("vicuna_v1.1", "3"): ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the user's questions. USER: A ASSISTANT: "
                           "B</s>USER: C ASSISTANT: D</s>USER: E ASSISTANT:"),
    ("vicuna_v0", "sys"): "SYS\n### Human: Hi\n### Assistant:",
    ("alpaca", "sys"): "SYS\n\n### Instruction:\nHi\n\n### Response:\n",
    ("llama-2", "sys"): "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST]",
    ("llama-2", "3"): "[INST] A [/INST] B </s><s>[INST] C [/INST] D </s><s>[INST] E [/INST]",
    ("llama-3", "sys"): ("<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|><|start_header_id|>user"
                         "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("chatml", "sys"): "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ("belle", "3"): "Human: \nA\n\nAssistant: \nB</s>Human: \nC\n\nAssistant: \nD</s>Human: \nE\n\nAssistant: \n",
    ("raw", "3"): "A\nB\nC\nD\nE\n",
}


@pytest.mark.parametrize("name,case", list(GOLDEN))
def test_template_renders_golden_string(name, case):
    msgs = SYS_1 if case == "sys" else TURNS_3
    assert TemplateRegistry.builtin().get(name).render(msgs) == GOLDEN[(name, case)]


@pytest.mark.parametrize("name", TemplateRegistry.builtin().names())
def test_each_turn_prompt_is_a_prefix_of_the_next(name):
    """Prefix caching across turns depends on this."""
    tpl = TemplateRegistry.builtin().get(name)
    turn1 = tpl.render(TURNS_3[:1], add_generation_prompt=False)
    turn3 = tpl.render(TURNS_3)
    assert turn3.startswith(turn1)


def test_model_names_match_their_family_template():
    reg = TemplateRegistry.builtin()
    assert reg.match("lmsys/vicuna-7b-v1.5").name == "vicuna_v1.1"
    assert reg.match("Llama-2-13b-chat-hf").name == "llama-2"
    assert reg.match("BELLE-7B-2M").name == "belle"
    assert reg.match("my-base-model") is None


def test_unknown_template_name_says_which_exist():
    with pytest.raises(KeyError, match="vicuna_v1.1"):
        TemplateRegistry.builtin().get("nope")
