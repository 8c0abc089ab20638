"""Golden strings: the exact prompt each template renders for fixed message sets."""

import pytest

from chatserve.conversation import TemplateRegistry

SYS_1 = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}]
TURNS_3 = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
           {"role": "assistant", "content": "D"}, {"role": "user", "content": "E"}]

CONSECUTIVE = [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]
ONE = [{"role": "user", "content": "A"}]
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
HUMAN_SYS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
CASES = {"sys": SYS_1, "3": TURNS_3, "consecutive": CONSECUTIVE, "1": ONE}

GOLDEN = {
    ("vicuna_v1.1", "sys"): "SYS USER: Hi ASSISTANT:",
    ("vicuna_v1.1", "3"): ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the user's questions. USER: A ASSISTANT: "
                           "B</s>USER: C ASSISTANT: D</s>USER: E ASSISTANT:"),
    ("vicuna_v0", "sys"): "SYS\n### Human: Hi\n### Assistant:",
    # exactly Stanford Alpaca's PROMPT_DICT (no newline after "### Response:"; the target is output + EOS)
    ("alpaca", "1"): ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nA\n\n### Response:"),
    ("alpaca", "consecutive"): ("Below is an instruction that describes a task, paired with an input that provides "
                                "further context. Write a response that appropriately completes the request.\n\n"
                                "### Instruction:\nA\n\n### Input:\nB\n\n### Response:"),
    ("alpaca", "sys"): "SYS\n\n### Instruction:\nHi\n\n### Response:",
    ("alpaca", "3"): (ALPACA + "\n\n### Instruction:\nA\n\n### Response:B</s>\n\n### Instruction:\nC\n\n"
                      "### Response:D</s>\n\n### Instruction:\nE\n\n### Response:"),
    ("vicuna_v1.1", "consecutive"): VICUNA + " USER: A USER: B ASSISTANT:",
    ("colossalchat", "sys"): "SYS\n\nHuman: Hi</s>Assistant: ",
    ("colossalchat", "3"): HUMAN_SYS + "\n\nHuman: A</s>Assistant: B</s>Human: C</s>Assistant: D</s>Human: E</s>Assistant: ",
    ("colossal-llama-2", "3"): (HUMAN_SYS + "\n\nHuman: <s>A</s>Assistant: <s>B</s>Human: <s>C</s>Assistant: <s>D</s>"
                                "Human: <s>E</s>Assistant: <s>"),
    ("zero_shot", "3"): HUMAN_SYS + "\n### Human: A\n### Assistant: B\n### Human: C\n### Assistant: D\n### Human: E\n### Assistant:",
    ("belle", "consecutive"): "Human: \nA\n\nHuman: \nB\n\nAssistant: \n",
    ("llama-2", "sys"): "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST]",
    ("llama-2", "3"): "[INST] A [/INST] B </s><s>[INST] C [/INST] D </s><s>[INST] E [/INST]",
    ("llama-3", "sys"): ("<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|><|start_header_id|>user"
                         "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("chatml", "sys"): "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ("belle", "3"): "Human: \nA\n\nAssistant: \nB</s>Human: \nC\n\nAssistant: \nD</s>Human: \nE\n\nAssistant: \n",
    ("raw", "3"): "A\nB\nC\nD\nE\n",
    # Mistral-7B-Instruct's model card: "<s>[INST] What is your favourite condiment? [/INST]Well, ...</s> [INST]
    # Do you have mayonnaise recipes? [/INST]" (the BOS token is added to the ids, not the text)
    ("mistral", "3"): "[INST] A [/INST]B</s> [INST] C [/INST]D</s> [INST] E [/INST]",
    ("mistral", "sys"): "[INST] SYS\n\nHi [/INST]",
    # Phi-3's model card: "<|system|>\n...<|end|>\n<|user|>\nQuestion?<|end|>\n<|assistant|>\n"
    ("phi-3", "sys"): "<|system|>\nSYS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
    ("phi-3", "3"): ("<|user|>\nA<|end|>\n<|assistant|>\nB<|end|>\n<|user|>\nC<|end|>\n<|assistant|>\nD<|end|>\n"
                     "<|user|>\nE<|end|>\n<|assistant|>\n"),
    ("deepseek-r1", "sys"): "SYS<｜User｜>Hi<｜Assistant｜><think>\n",
    ("deepseek-r1", "3"): "<｜User｜>A<｜Assistant｜>B<｜end▁of▁sentence｜><｜User｜>C<｜Assistant｜>D<｜end▁of▁sentence｜>"
                          "<｜User｜>E<｜Assistant｜><think>\n",
}


@pytest.mark.parametrize("name,case", list(GOLDEN))
def test_template_renders_golden_string(name, case):
    assert TemplateRegistry.builtin().get(name).render(CASES[case]) == GOLDEN[(name, case)]


def test_one_shot_puts_fastchats_example_before_the_conversation_and_zero_shot_does_not():
    reg = TemplateRegistry.builtin()
    one, zero = reg.get("one_shot").render(ONE), reg.get("zero_shot").render(ONE)
    assert one.startswith(HUMAN_SYS + "\n### Human: What are the key differences between renewable and non-renewable")
    assert one.endswith("economic and social instability.\n### Human: A\n### Assistant:")
    assert zero == HUMAN_SYS + "\n### Human: A\n### Assistant:"


def test_every_named_template_of_the_issue_exists():
    names = set(TemplateRegistry.builtin().names())
    assert {"vicuna_v1.1", "vicuna_v0", "alpaca", "llama-2", "llama-3", "chatml", "belle", "colossalchat",
            "colossal-llama-2", "zero_shot", "one_shot", "raw"} <= names


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
    assert reg.match("hpcai-tech/Colossal-LLaMA-2-7b-base").name == "colossal-llama-2"
    assert reg.match("coati-7b").name == "colossalchat"
    assert reg.match("chavinlo/alpaca-native").name == "alpaca"
    assert reg.match("my-base-model") is None


def test_unknown_template_name_says_which_exist():
    with pytest.raises(KeyError, match="vicuna_v1.1"):
        TemplateRegistry.builtin().get("nope")
