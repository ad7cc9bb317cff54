"""Loading and locating matrices; task formats, scoring rules and splits."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from laser_core import ConfigError, ModelLoadError, ModelSpec, TaskFormatError, TaskSpec, load_model, load_task, make_splits
from laser_core.evaluate import evaluate
from laser_core.matrices import locate_matrices
from laser_core.tasks import Example

from conftest import write_jsonl


def test_locate_matrices_gpt2_undoes_conv1d_transposition(tiny_lm):
    lm = tiny_lm("gpt2")
    refs = {(r.layer, r.type): r for r in lm.matrices}
    assert set(t for _, t in refs) == {"qkv", "o", "up", "down"}
    assert refs[(0, "up")].shape == (128, 32) and refs[(0, "up")].transposed  # Conv1D weight is (32, 128)
    assert dict(lm.model.named_parameters())[refs[(0, "up")].name].shape == (32, 128)


@pytest.mark.parametrize("arch,count,types", [("llama", 14, {"q", "k", "v", "o", "gate", "up", "down"}),
                                              ("roberta", 12, {"q", "k", "v", "o", "up", "down"})])
def test_locate_matrices_uses_the_architecture_table(tiny_lm, arch, count, types):
    lm = tiny_lm(arch)
    assert len(lm.matrices) == count
    assert {r.type for r in lm.matrices} == types
    assert [r.layer for r in lm.matrices] == sorted(r.layer for r in lm.matrices)


def test_unknown_architecture_falls_back_to_generic_discovery():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.layers = torch.nn.ModuleList([Block(), Block()])

    refs = locate_matrices(Toy())
    assert [(r.layer, r.type) for r in refs] == [(0, "mix"), (1, "mix")]


def test_missing_path_and_non_model_folder_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="model not found"):
        load_model(ModelSpec(str(tmp_path / "nope"), "cpu"))
    monkeypatch.chdir(tmp_path)
    for relative in ("./nope", "../nope", "~/nope"):  # paths, never hub ids: no hub lookup, no "not in the cache"
        with pytest.raises(ModelLoadError, match=f"model not found: there is no folder '{re.escape(relative)}' here"):
            load_model(ModelSpec(relative, "cpu"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(str(tmp_path), "cpu"))


def test_uncached_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model(ModelSpec("no-such-org/no-such-model", "cpu"))


def test_a_vision_language_model_offers_its_language_models_matrices_only(tokenizer):
    """Gemma 3 from 4B up is a vision-language model: its vision tower's ``encoder.layers.<i>`` matched the generic
    pattern, so layer 0 listed both towers' matrices under types such as ``self_attn.q_proj``."""
    from conftest import build_other
    from laser_core.models import from_module

    lm = from_module(build_other("gemma3", tokenizer), tokenizer)
    assert all(r.name.startswith("model.language_model.layers.") for r in lm.matrices)
    assert {r.type for r in lm.matrices} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert len(lm.matrices) == 7 * 3 and sorted({r.layer for r in lm.matrices}) == [0, 1, 2]


def test_a_model_with_a_scalar_weight_or_buffer_is_fingerprinted(tiny_dirs):
    """A 0-d tensor (Gemma's embedding scale is one) has no byte view: loading a model with a persistent one failed
    in the fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from laser_core.models import from_module, weight_hashes

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    model.register_buffer("scale", torch.tensor(2.0))
    lm = from_module(model, AutoTokenizer.from_pretrained(tiny_dirs["llama"]))
    with torch.no_grad():
        model.scale.fill_(3.0)
    assert "scale" in weight_hashes(model) and from_module(model, lm.tokenizer).fingerprint != lm.fingerprint


def _host_does_not_resolve(monkeypatch):
    """The hub's host name has no address (as offline), whatever the network here; no proxy, offline mode off."""
    import socket

    from huggingface_hub import constants

    def no_address(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_address)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_hub_unreachable_when_its_host_does_not_resolve_unless_a_proxy_resolves_it(monkeypatch):
    from laser_core.hub import hub_unreachable

    _host_does_not_resolve(monkeypatch)
    assert hub_unreachable() == "huggingface.co does not resolve"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_unreachable() is None  # the proxy looks the name up, not this machine
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub_unreachable() == "huggingface.co does not resolve"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_hub_unreachable_when_its_host_resolves_but_takes_no_connection(monkeypatch):
    """A firewall that drops the hub's packets: before, the probe trusted the name lookup, and each of transformers'
    requests then waited out huggingface_hub's retries (~26 s)."""
    import socket

    from laser_core.hub import CONNECT_SECONDS, hub_unreachable

    _host_does_not_resolve(monkeypatch)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **kw: [(socket.AF_INET, 1, 6, "",
                                                                             ("10.0.0.1", port))])
    asked = []

    def dropped(address, timeout=None):
        asked.append((address, timeout))
        raise socket.timeout("timed out")
    monkeypatch.setattr(socket, "create_connection", dropped)
    assert hub_unreachable() == ("huggingface.co does not take a connection (no answer on port 443 within "
                                 f"{CONNECT_SECONDS:g} s)")
    assert asked == [(("huggingface.co", 443), CONNECT_SECONDS)]

    def refused(address, timeout=None):
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(socket, "create_connection", refused)
    assert hub_unreachable() == "huggingface.co does not take a connection (port 443: Connection refused)"
    closed = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: type(
        "Conn", (), {"close": lambda self: closed.append(address)})())
    assert hub_unreachable() is None and closed == [("huggingface.co", 443)]


def test_uncached_hub_model_and_dataset_fail_at_once_when_the_hub_does_not_resolve(monkeypatch):
    """Before, huggingface_hub retried each request 5 times (~27 s) and the message only guessed "offline?"."""
    from huggingface_hub import constants

    _host_does_not_resolve(monkeypatch)
    for repo_id in ("no-such-org/no-such-model", "no-such-model"):  # the second: a name without owner, as "gpt2"
        with pytest.raises(ModelLoadError, match=f"'{repo_id}' is not in the local Hugging Face cache and cannot be "
                                                 f"downloaded: huggingface.co does not resolve.* no folder '{repo_id}'"):
            load_model(ModelSpec(repo_id, "cpu"))
    with pytest.raises(TaskFormatError, match="'no-such-org/no-such-data' .* not in the local cache and cannot be "
                                              "downloaded: huggingface.co does not resolve"):
        load_task(TaskSpec("hf:no-such-org/no-such-data"))
    import datasets.config
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # offline mode restored


def test_hf_dataset_with_several_configs_loads_the_one_named_and_a_missing_one_lists_them(tmp_path, monkeypatch):
    """Most evaluation sets on the hub (MMLU, ARC, BoolQ, TruthfulQA) need a config: before, none could be given and
    the error said the dataset was "not in the local cache and cannot be downloaded"."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # its Arrow files go here
    folder = tmp_path / "quiz"  # a dataset folder with two configs, as a hub dataset repository has them
    folder.mkdir()
    for config, word in (("easy", "even"), ("hard", "prime")):
        rows = [{"question": f"Is {i} {word}?", "choices": ["yes", "no"], "answer": i % 2} for i in range(12)]
        write_jsonl(folder / f"{config}.jsonl", rows)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: test\n"
                                      "    path: easy.jsonl\n- config_name: hard\n  data_files: hard.jsonl\n---\n")
    easy = load_task(TaskSpec(f"hf:{folder}:easy:test", prompt_col="question"))
    hard = load_task(TaskSpec(f"hf:{folder}:hard:train", prompt_col="question"))
    assert (easy.name, hard.name) == ("quiz-easy", "quiz-hard") and easy.digest != hard.digest
    assert [e.prompt for e in easy.examples][:2] == ["Is 0 even?", "Is 1 even?"] and len(hard.examples) == 12
    assert "prime" in hard.examples[0].prompt
    with pytest.raises(TaskFormatError, match=r"Config name is missing.*\['easy', 'hard'\].*name one as "
                                              rf"hf:{re.escape(str(folder))}:<config>:test"):
        load_task(TaskSpec(f"hf:{folder}:test", prompt_col="question"))
    with pytest.raises(TaskFormatError, match=r"\(config 'easy', split 'train'\): Unknown split \"train\". Should be "
                                              r"one of \['test'\]"):
        load_task(TaskSpec(f"hf:{folder}:easy:train", prompt_col="question"))
    for bad in ("hf:", f"hf:{folder}:easy:test:more", f"hf:{folder}::test"):
        with pytest.raises(TaskFormatError, match="is not a Hugging Face dataset reference: write hf:<dataset>"):
            load_task(TaskSpec(bad, prompt_col="question"))


def test_choices_as_text_and_label_lists_take_the_answer_as_a_label(tmp_path):
    """The hub's ARC, OpenBookQA and CommonsenseQA store choices as {"text": [...], "label": [...]} and the answer as
    a label ("B", or "1" for the first choice of ARC's numbered rows): before, such a file was refused."""
    rows = [{"prompt": "Sky?", "choices": {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}, "answer": "B"},
            {"prompt": "Grass?", "choices": {"text": ["red", "blue", "green"], "label": ["1", "2", "3"]}, "answer": "3"},
            {"prompt": "Blood?", "choices": {"text": ["red", "blue"], "label": ["2", "1"]}, "answer": "1"}]
    p = tmp_path / "arc.jsonl"
    write_jsonl(p, rows)
    task = load_task(TaskSpec(str(p)))
    assert [(e.choices, e.answer) for e in task.examples] == [((" red", " blue", " green"), 1),
                                                              ((" red", " blue", " green"), 2), ((" red", " blue"), 1)]
    write_jsonl(p, [{**rows[0], "answer": "D"}])
    with pytest.raises(TaskFormatError, match=r"answer 'D' is not one of the choices \['red', 'blue', 'green'\] nor of "
                                              r"their labels \['A', 'B', 'C'\]"):
        load_task(TaskSpec(str(p)))


def test_choices_that_mark_the_right_one_need_no_answer_column(tmp_path):
    """TruthfulQA's multiple_choice config on the hub: {"choices": [...], "labels": [1, 0, ...]} under mc1_targets,
    no answer column. Before, such rows were refused; several right answers (mc2_targets) still are, by name."""
    rows = [{"question": "Are bats blind?", "mc1_targets": {"choices": ["No", "Yes"], "labels": [1, 0]}},
            {"question": "Is the sun a star?", "mc1_targets": {"choices": ["No", "Yes", "Maybe"], "labels": [0, 1, 0]}}]
    p = tmp_path / "tqa.jsonl"
    write_jsonl(p, rows)
    task = load_task(TaskSpec(str(p), choices_col="mc1_targets", prompt_template="Q: {question}\\nA:"))
    assert [(e.prompt, e.choices, e.answer) for e in task.examples] == [
        ("Q: Are bats blind?\nA:", (" No", " Yes"), 0), ("Q: Is the sun a star?\nA:", (" No", " Yes", " Maybe"), 1)]
    write_jsonl(p, [{"question": "Q?", "mc2_targets": {"choices": ["a", "b", "c"], "labels": [1, 1, 0]}}])
    with pytest.raises(TaskFormatError, match=r"line 1: the labels \[1, 1, 0\] must mark exactly one of the 3 choices "
                                              r"with 1 \(a set with several right answers"):
        load_task(TaskSpec(str(p), prompt_col="question", choices_col="mc2_targets"))


@pytest.mark.parametrize("repo_id", ["someone/tiny", "tiny"])
def test_cached_hub_model_loads_without_asking_the_hub_when_it_does_not_resolve(tmp_path, tiny_dirs, repo_id):
    """A hub id in the local HF cache, with a hub whose name does not resolve: before, transformers asked it for each
    optional file (chat template, generation config, ...) with 5 retries each, 2 min 28 s measured for one load.
    An id without owner (as "gpt2", "roberta-base") was refused as "model not found" before it was looked up."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(tiny_dirs["llama"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://hub.invalid")  # .invalid never resolves (RFC 2606)
    code = ("from laser_core import ModelSpec, load_model\n"
            f"lm = load_model(ModelSpec({repo_id!r}, 'cpu'))\n"
            "print('loaded', lm.kind, len(lm.matrices))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "loaded causal 14"
    assert "hub.invalid" not in out.stderr  # no request was tried (each failed one is logged with its URL)


def test_load_model_makes_room_only_once_the_source_is_checked_and_before_the_weights_load(tiny_dirs, tmp_path,
                                                                                         monkeypatch):
    """The dashboard drops the model used longest ago there: a wrong source must drop nothing."""
    import transformers
    calls = []
    for bad in (tmp_path / "nowhere", tmp_path, tmp_path / "x.gguf"):
        with pytest.raises(ModelLoadError):
            load_model(ModelSpec(str(bad), "cpu"), make_room=lambda: calls.append("room"))
    with pytest.raises(ModelLoadError, match="unknown device"):
        load_model(ModelSpec(str(tiny_dirs["llama"]), "tpu"), make_room=lambda: calls.append("room"))
    assert calls == []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: calls.append("weights") or real(*a, **kw))
    lm = load_model(ModelSpec(str(tiny_dirs["llama"]), "cpu"), make_room=lambda: calls.append("room"))
    assert calls == ["room", "weights"] and lm.matrices


def test_bundled_tasks_load_with_bigbench_prompt_format():
    fever = load_task(TaskSpec("fever"))
    assert fever.kind == "mc" and len(fever) == 6612
    ex = fever.examples[0]
    assert ex.prompt.endswith("\nA:") and ex.choices == (" true", " false")
    assert load_task(TaskSpec("qa_wikidata")).kind == "gen"
    assert load_task(TaskSpec("truthful_qa")).examples[0].prompt.startswith("Q: What is human life expectancy")
    assert len(load_task(TaskSpec("epistemic_reasoning"))) == 2000


def _bigbench_file(tmp_path, examples, **settings):
    p = tmp_path / "task.json"
    p.write_text(json.dumps({"name": "t", **settings, "examples": examples}))
    return p


def test_bigbench_task_lists_its_choices_in_the_prompt_as_bigbench_does(tmp_path, caplog):
    """Unless a task.json sets append_choices_to_input false, BIG-bench appends the choices to the input, each after
    choice_prefix, in the order of numpy's RandomState(42).permutation of the sorted choices. The expected prompts
    are what BIG-bench 1.0.0's own default_format_fn printed for these examples."""
    exs = [{"input": "2+2=", "target_scores": {"4": 1, "5": 0, "22": 0}},
           {"input": "Sky?", "target_scores": {"red": 0, "blue": 1}},
           {"input": "Best?", "target_scores": {"b": 0, "d": 0.5, "a": 1, "c": 0.25}}]
    task = load_task(TaskSpec(str(_bigbench_file(tmp_path, exs))))
    assert [e.prompt for e in task.examples] == [
        "\nQ: 2+2=\n  choice: 22\n  choice: 4\n  choice: 5\nA:",
        "\nQ: Sky?\n  choice: red\n  choice: blue\nA:",
        "\nQ: Best?\n  choice: b\n  choice: d\n  choice: a\n  choice: c\nA:"]
    assert [e.choices[e.answer] for e in task.examples] == [" 4", " blue", " a"]  # highest score; order as written
    plain = load_task(TaskSpec(str(_bigbench_file(tmp_path, exs, append_choices_to_input=False, task_prefix=None,
                                                  example_input_prefix="", example_output_prefix=" ="))))
    assert plain.examples[0].prompt == "2+2= =" and plain.examples[0].choices == (" 4", " 5", " 22")  # null: none
    with caplog.at_level("WARNING", logger="laser_core.bigbench"):  # BIG-bench reads the text "false" as true
        texted = load_task(TaskSpec(str(_bigbench_file(tmp_path, exs, append_choices_to_input="false"))))
    assert texted.examples[1].prompt == task.examples[1].prompt
    assert f"{tmp_path.name}/task.json: 'append_choices_to_input' is 'false'" in caplog.text  # names the task's folder


def test_a_trailing_space_moves_into_the_continuation_and_the_text_read_stays_the_tasks(tmp_path):
    """Tokenizers read "A:" + " true" better than "A: " + "true"; one space moves, so "has  " keeps its two."""
    p = tmp_path / "t.jsonl"
    prompts = ["A:", "A: ", "Bob has  ", "Line\n"]
    write_jsonl(p, [{"prompt": q, "choices": ["x", " y"], "answer": 0} for q in prompts])
    task = load_task(TaskSpec(str(p)))
    assert [(e.prompt, e.choices) for e in task.examples] == [
        ("A:", (" x", " y")), ("A:", (" x", "  y")), ("Bob has ", (" x", "  y")), ("Line\n", ("x", " y"))]
    for q, e in zip(prompts, task.examples):  # the text scored is the task's own, but for a space before "x"
        assert e.prompt + e.choices[1] == q + " y" and e.prompt + e.choices[0] in (q + "x", q + " x")


def test_bigbench_text_target_is_one_answer_and_bad_scores_are_refused(tmp_path):
    task = load_task(TaskSpec(str(_bigbench_file(tmp_path, [{"input": "Q: [0, 5]", "target": "[]"},
                                                          {"input": "Q: [1]", "target": ["[1]", "1"]}]))))
    assert [e.targets for e in task.examples] == [(" []",), (" [1]", " 1")]  # "[]" is an answer, not an empty list
    with pytest.raises(TaskFormatError, match=r"/task.json: example 1: no choice scores above the others"):
        load_task(TaskSpec(str(_bigbench_file(tmp_path, [{"input": "a", "target_scores": {"x": 1, "y": 0}},
                                                          {"input": "b", "target_scores": {"x": 0, "y": 0}}]))))
    with pytest.raises(TaskFormatError, match=r"example 0: 'target_scores' must map each choice to a number"):
        load_task(TaskSpec(str(_bigbench_file(tmp_path, [{"input": "a", "target_scores": {"x": "high", "y": 0}}]))))
    with pytest.raises(TaskFormatError, match=r"task.json: 'task_prefix' must be text, got 3"):
        load_task(TaskSpec(str(_bigbench_file(tmp_path, [{"input": "a", "target": "b"}], task_prefix=3))))
    parent = tmp_path / "arithmetic"  # BIG-bench's tasks of subtasks: a task.json without examples, one folder each
    for sub in ("2_digit_addition", "1_digit_addition"):
        (parent / sub).mkdir(parents=True)
        _bigbench_file(parent / sub, [{"input": "1+1=", "target": "2"}])
    (parent / "task.json").write_text(json.dumps({"name": "arithmetic", "description": "sums"}))
    with pytest.raises(TaskFormatError, match="a BIG-bench task of subtasks, with no examples of its own; load one of "
                                              "its subtask folders: 1_digit_addition, 2_digit_addition$"):
        load_task(TaskSpec(str(parent)))
    assert len(load_task(TaskSpec(str(parent / "1_digit_addition")))) == 1


def test_answer_format_cuts_generated_text_as_bigbench_postprocess_output():
    """Expected answers worked by hand from BIG-bench's ``postprocess_output``: the text up to and including the first
    stop string (kept whole where it starts with it), then the regex's first match (its group), or "" with none."""
    from laser_core.answers import FIRST_LINE, AnswerFormat
    assert FIRST_LINE.answer("  Paris.\nQ: next") == "Paris." and FIRST_LINE.answer("\n\n") == ""
    dot = AnswerFormat(stop_string=".")
    assert dot.answer("The apple is on the ground. What is") == "The apple is on the ground."  # BIG-bench's example
    assert dot.answer(".5 and more") == ".5 and more"  # at the start: not cut
    number = AnswerFormat(output_regex=r"[-+]?\d+")
    assert number.answer("= 42. 7*7 = 49. 7*8 =") == "42" and number.answer("no digits") == ""
    assert number.answer(" 15\n") == "15"  # then matched: "5" is not exactly "15", which 'contains' would credit
    quoted = AnswerFormat(output_regex="('.*?')")  # a group: its text, as re.findall gives it
    assert quoted.answer("it is 'ab' or 'cd'") == "'ab'"
    both = AnswerFormat(stop_string="\n", output_regex=r"([-+]?\d+)[.]{0,1}$")  # the operators task's
    assert both.answer(" 12.\n13") == "12" and both.answer(" 12 apples\n") == ""
    assert both.describe() == r"stop_string '\n' and output_regex ([-+]?\d+)[.]{0,1}$" and FIRST_LINE.describe() == ""
    whole = AnswerFormat(output_regex="")  # set, but empty: BIG-bench then cuts nothing, not even at a line break
    assert whole.answer(" 12\n13 ") == "12\n13" and whole.describe() == "output_regex '' (the whole text)"
    for bad, said in (({"output_regex": "(a)(b)"}, "has 2 groups; it may have at most one"),
                      ({"output_regex": "(unclosed"}, "is not a regular expression"),
                      ({"stop_string": 3}, "'stop_string' must be text, got 3")):
        with pytest.raises(TaskFormatError, match=re.escape(said)):
            AnswerFormat(**bad)


def test_a_bigbench_generation_file_cuts_answers_by_its_settings_and_says_which_match_bigbench_scores_by(
        tmp_path, caplog):
    from laser_core.answers import FIRST_LINE, AnswerFormat
    exs = [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(4)]
    plain = load_task(TaskSpec(str(_bigbench_file(tmp_path, exs))))
    assert plain.answer_format == FIRST_LINE
    with caplog.at_level("WARNING", logger="laser_core.bigbench"):
        cut = load_task(TaskSpec(str(_bigbench_file(tmp_path, exs, output_regex=r"[-+]?\d+", stop_string="\n",
                                                     preferred_score="exact_str_match"))))
    assert cut.answer_format == AnswerFormat("\n", r"[-+]?\d+") and cut.examples == plain.examples
    assert cut.digest != plain.digest  # its results are its own in the cache
    assert "BIG-bench scores this task by exact match" in caplog.text and "'contains' rule" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="laser_core.bigbench"):
        load_task(TaskSpec(str(tmp_path / "task.json"), match="exact"))
    assert not caplog.text  # scored as BIG-bench scores it: nothing to say
    with pytest.raises(TaskFormatError, match=r"task.json: 'output_regex' '\(a\)\(b\)' has 2 groups"):
        load_task(TaskSpec(str(_bigbench_file(tmp_path, exs, output_regex="(a)(b)"))))
    mc = load_task(TaskSpec(str(_bigbench_file(tmp_path, [{"input": "a", "target_scores": {"x": 1, "y": 0}}],
                                               output_regex="x"))))
    assert mc.answer_format == FIRST_LINE  # multiple choice generates nothing to cut
    wikidata = load_task(TaskSpec("qa_wikidata"))  # no settings: first line, and the digest its results have had
    assert wikidata.answer_format == FIRST_LINE and wikidata.digest == "c1d7667d6f6c0196"


def test_generation_scores_the_answer_the_tasks_format_cuts(tiny_dirs, tmp_path, capsys):
    """Through the evaluator and the CLI: targets that are each generated text's first non-space character are
    right when the task's regex cuts that character, and wrong by the whole first line."""
    from laser_core.answers import AnswerFormat
    from laser_core.cli import main
    lm = load_model(ModelSpec(str(tiny_dirs["llama"]), "cpu"))
    prompts = [f"Count{' up' * (i % 4)} to {i}:" for i in range(24)]
    said = evaluate(lm, [Example(q, targets=(" x",)) for q in prompts], max_new_tokens=4).predictions
    assert all(len(p) > 1 for p in said)  # a first line longer than its first character
    ex = [Example(q, targets=(" " + p[0],)) for q, p in zip(prompts, said)]
    first = AnswerFormat(output_regex=r"\S")
    assert evaluate(lm, ex, max_new_tokens=4, match="exact").accuracy == 0.0
    cut = evaluate(lm, ex, max_new_tokens=4, match="exact", answer_format=first)
    assert cut.accuracy == 1.0 and cut.predictions == [p[0] for p in said]
    path = _bigbench_file(tmp_path, [{"input": q, "target": p[0]} for q, p in zip(prompts, said)],
                          example_input_prefix="", example_output_prefix="", output_regex=r"\S")
    assert load_task(TaskSpec(str(path))).examples[0].prompt == prompts[0]
    assert main(["eval", "--model", str(tiny_dirs["llama"]), "--task", str(path), "--n-calib", "10", "--n-test", "10",
                 "--max-new-tokens", "4", "--split", "calib", "--match", "exact", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "calib: accuracy 1.000" in out and r"(answers cut by the task file's output_regex \S, then matched by " \
        "the 'exact' rule)" in out, out


def test_few_shot_prompts_start_with_solved_examples_that_no_split_holds_and_the_splits_stay_the_zero_shot_ones(
        tmp_path):
    from conftest import write_mc_jsonl
    path = write_mc_jsonl(tmp_path / "even.jsonl", 40)
    task = load_task(TaskSpec(str(path), shots=3))  # loading is the same; splitting draws the shots
    spec = TaskSpec(str(path), n_calib=10, n_test=10, n_val=7, seed=5)
    zero, three = make_splits(task, spec), make_splits(task, dataclasses.replace(spec, shots=3))
    assert make_splits(task, dataclasses.replace(spec, shots=0)) == zero  # zero-shot: as it was
    assert (three.calib, three.val, three.test) == (zero.calib, zero.val, zero.test)  # the same questions
    lead = three.task.examples[0].prompt[:-len(task.examples[0].prompt)]
    solved = lead.split("\n\n")[:-1]  # each solved example, then the separator
    by_prompt = {e.prompt: e for e in task.examples}
    drawn = [text.rsplit(" ", 1)[0] for text in solved]  # the prompt; then the right choice, as scored
    assert len(solved) == 3 and [by_prompt[q].choices[by_prompt[q].answer] for q in drawn] == \
        [" " + text.rsplit(" ", 1)[1] for text in solved]
    assert all(e.prompt == lead + t.prompt for e, t in zip(three.task.examples, task.examples))
    held = {task.examples[i].prompt for split in ("calib", "val", "test") for i in getattr(three, split)}
    assert not held & set(drawn)  # never asked
    assert three.task.digest != task.digest and make_splits(task, dataclasses.replace(spec, shots=3)) == three
    assert make_splits(task, dataclasses.replace(spec, shots=3, seed=6)).task.examples[0].prompt != \
        three.task.examples[0].prompt  # seeded
    small = make_splits(task, TaskSpec(str(path), n_calib=10, n_test=30, shots=3))  # no examples to spare: test shrinks
    assert len(small.test) < len(make_splits(task, TaskSpec(str(path), n_calib=10, n_test=30)).test)
    assert len(small.calib) + len(small.val) + len(small.test) == 37
    with pytest.raises(TaskFormatError, match="40 distinct examples, too few for 37 calibration examples plus at least "
                                              "1 test example and 3 few-shot examples; lower the calibration size "
                                              r"\(n_calib\) to at most 36, e.g. 18 .*, or the shots"):
        make_splits(task, TaskSpec(str(path), n_calib=37, shots=3))
    with pytest.raises(ConfigError, match="shots must be >= 0"):
        TaskSpec(str(path), shots=-1)


def test_a_bigbench_file_few_shot_says_its_task_prefix_once_and_separates_as_it_says(tmp_path):
    exs = [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(6)]
    path = _bigbench_file(tmp_path, exs, task_prefix="Sums.", few_shot_example_separator=" | ")
    task = load_task(TaskSpec(str(path)))
    assert task.examples[0].prompt == "Sums.\nQ: 0+1=\nA:"
    two = make_splits(task, TaskSpec(str(path), n_calib=1, n_test=1, shots=2))
    prompt = two.examples("calib")[0].prompt
    assert prompt.startswith("Sums.\nQ: ") and prompt.count("Sums.") == 1 and prompt.count(" | ") == 2
    shots = [re.fullmatch(r"(Sums\.)?\nQ: (\d)\+1=\nA: (\d)", text) for text in prompt.split(" | ")[:2]]
    assert all(m and int(m[3]) == int(m[2]) + 1 for m in shots)  # solved: the right answer after each
    asked = [int(re.search(r"Q: (\d)\+1=\nA:$", e.prompt)[1]) for split in ("calib", "val", "test")
             for e in two.examples(split)]
    assert [e.targets for split in ("calib", "val", "test") for e in two.examples(split)] == \
        [(f" {q + 1}",) for q in asked]
    assert not {int(m[2]) for m in shots} & set(asked)
    plain = load_task(TaskSpec(str(_bigbench_file(tmp_path, exs))))  # BIG-bench's separator: a line break
    one = make_splits(plain, TaskSpec(str(tmp_path / "task.json"), n_calib=1, n_test=1, shots=1))
    assert re.fullmatch(r"\nQ: \d\+1=\nA: \d\n\nQ: \d\+1=\nA:", one.examples("test")[0].prompt)


def test_splits_are_disjoint_seeded_and_test_is_stable_across_calibration_sizes():
    task = load_task(TaskSpec("fever"))
    a = make_splits(task, TaskSpec("fever", n_calib=100, n_test=50, seed=3))
    b = make_splits(task, TaskSpec("fever", n_calib=40, n_test=50, seed=3))
    c = make_splits(task, TaskSpec("fever", n_calib=100, n_test=50, seed=4))
    assert not set(a.calib) & set(a.test) and not set(a.val) & (set(a.calib) | set(a.test))
    distinct = len({(e.prompt, e.choices) for e in task.examples})
    assert distinct < 6612  # BIG-bench FEVER repeats some claims: they are dropped before splitting
    assert len(a.val) == round(0.2 * distinct)
    prompts = [{task.examples[i].prompt for i in part} for part in (a.calib, a.val, a.test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert a.test == b.test and a.test != c.test


def test_more_calibration_than_examples_is_refused(mc_task):
    with pytest.raises(TaskFormatError, match="60 distinct examples, too few for 100 calibration examples plus at least 1 test example; lower the "
                                          r"calibration size \(n_calib\) to at most 59, e.g. 30 "):
        make_splits(load_task(TaskSpec(str(mc_task))), TaskSpec(str(mc_task), n_calib=100))


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": 0}\n{bad json\n', "line 2 is not valid JSON"),
    ('{"question": "a", "choices": ["x", "y"], "answer": 0}\n', "no prompt column 'prompt'"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": 5}\n', "answer index 5 is out of range"),
    ('{"prompt": "a", "choices": ["x"], "answer": 0}\n', "at least 2 choices"),
    ('{"prompt": "a", "choices": ["x", "y", "x"], "answer": 2}\n', "line 1: the choices repeat 'x'; give each choice once"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": true}\n', "answer must be a choice index or the choice text, got True"),
    ('{"prompt": "Pick:", "choices": ["A", " A", "B"], "answer": 2}\n',
     "line 1: the choices 'A', ' A' read the same after the prompt \\(they differ only by a leading space\\)"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": 0.5}\n', "answer must be a choice index or the choice text, got 0.5"),
    ('{"prompt": "a", "choices": ["x", "y"]}\n', r"line 1: no answer column 'answer' \(columns: \['choices', 'prompt'\]\)"),
])
def test_malformed_jsonl_names_the_problem_and_line(tmp_path, content, match):
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(TaskFormatError, match=match):
        load_task(TaskSpec(str(p)))


def test_a_json_array_of_records_loads_as_jsonl_does(tmp_path):
    """pandas' to_json(orient="records") and many exports write one JSON array, not JSON Lines: before, a .json
    was read as BIG-bench only and such a file was refused as "not a BIG-bench task"."""
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    spec = dict(prompt_template="Q: {question}\\nA:")
    as_array, as_lines = (load_task(TaskSpec(str(tmp_path / f), **spec)) for f in ("t.json", "t.jsonl"))
    assert as_array.digest == as_lines.digest and len(as_array) == 6 and as_array.examples[1].prompt == "Q: Is 1 even?\nA:"
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], "oops"]))
    with pytest.raises(TaskFormatError, match="bad.json: record 2 is not a JSON object"):
        load_task(TaskSpec(str(tmp_path / "bad.json"), **spec))
    (tmp_path / "gap.json").write_text(json.dumps([rows[0], {"question": "Is 9 even?", "choices": ["yes", "no"]}]))
    with pytest.raises(TaskFormatError, match=r"gap.json: record 2: no answer column 'answer'"):
        load_task(TaskSpec(str(tmp_path / "gap.json"), **spec))
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(TaskFormatError, match="none.json: the array holds no records"):
        load_task(TaskSpec(str(tmp_path / "none.json")))


def test_a_parquet_file_loads_as_jsonl_does(tmp_path):
    """The hub stores datasets as Parquet: a downloaded file loads with the same column mapping, list columns as lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"Is {i} even?", "opts": ["yes", "no"], "gold": i % 2} for i in range(5)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    spec = dict(prompt_col="q", choices_col="opts", answer_col="gold")
    table, lines = (load_task(TaskSpec(str(tmp_path / f), **spec)) for f in ("t.parquet", "t.jsonl"))
    assert table.digest == lines.digest and table.examples[3].choices == (" yes", " no") and table.examples[3].answer == 1
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "short.parquet")
    with pytest.raises(TaskFormatError, match=r"short.parquet: row 1: no prompt column 'prompt'"):
        load_task(TaskSpec(str(tmp_path / "short.parquet")))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TaskFormatError, match="broken.parquet: not a readable Parquet file"):
        load_task(TaskSpec(str(tmp_path / "broken.parquet")))


def test_choices_from_several_columns_and_answers_that_count_from_one(tmp_path):
    """PIQA holds its choices in sol1 and sol2 (label 0/1); Winogrande in option1 and option2 with the answer "1" or
    "2". Before, neither could be read: the choices had to be one column, and answers counted from 0."""
    piqa = tmp_path / "piqa.jsonl"
    write_jsonl(piqa, [{"goal": "Dry wet hair.", "sol1": "Use a towel.", "sol2": "Use a rock.", "label": 0},
                       {"goal": "Cool tea.", "sol1": "Heat it.", "sol2": "Add ice.", "label": 1}])
    task = load_task(TaskSpec(str(piqa), choices_col="sol1, sol2", answer_col="label", prompt_template="{goal}\\nA:"))
    assert [(e.choices, e.answer) for e in task.examples] == [((" Use a towel.", " Use a rock."), 0),
                                                              ((" Heat it.", " Add ice."), 1)]
    wino = tmp_path / "wino.jsonl"
    rows = [{"sentence": "The cup fell off the shelf because _ was tilted.", "option1": "the cup",
             "option2": "the shelf", "answer": "2"},
            {"sentence": "The ice melted in the sun because _ was hot.", "option1": "the sun", "option2": "the ice",
             "answer": "1"}]
    write_jsonl(wino, rows)
    spec = dict(choices_col="option1,option2", prompt_template="{sentence}\\n_ is")
    assert [e.answer for e in load_task(TaskSpec(str(wino), answer_base=1, **spec)).examples] == [1, 0]
    with pytest.raises(TaskFormatError, match=r"wino.jsonl: line 1: answer index 2 is out of range for 2 choices "
                                              r"\(if the answers count the choices from 1, set answer base 1: "
                                              r"--answer-base 1\)"):
        load_task(TaskSpec(str(wino), **spec))
    write_jsonl(wino, [{**rows[0], "answer": "3"}])
    with pytest.raises(TaskFormatError, match=r"answer index 3 \(counting from 1\) is out of range for 2 choices"):
        load_task(TaskSpec(str(wino), answer_base=1, **spec))
    write_jsonl(wino, [{**rows[0], "answer": "the shelf"}, {**rows[1], "answer": "1"}])  # a text is read as it is
    assert [e.answer for e in load_task(TaskSpec(str(wino), answer_base=1, **spec)).examples] == [1, 0]
    write_jsonl(wino, [{k: v for k, v in rows[0].items() if k != "option2"}])
    with pytest.raises(TaskFormatError, match=r"line 1: no choices column 'option2' \(columns: "):
        load_task(TaskSpec(str(wino), answer_base=1, **spec))
    with pytest.raises(ConfigError, match="answer_base must be 0 or 1 \\(the index of the first choice\\), got 2"):
        TaskSpec(str(wino), answer_base=2)


def test_csv_with_column_mapping_and_choice_text_answer(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('q,opts,gold\n"Is 2 even? Answer:","yes|no",yes\n"Is 3 even? Answer:","[""yes"", ""no""]",1\n')
    task = load_task(TaskSpec(str(p), prompt_col="q", choices_col="opts", answer_col="gold"))
    assert [(e.choices, e.answer) for e in task.examples] == [((" yes", " no"), 0), ((" yes", " no"), 1)]


def test_csv_keeps_the_line_breaks_of_a_quoted_field_takes_the_headers_separator_and_names_bad_lines(tmp_path):
    """Spreadsheets write a multi-line prompt as one quoted field. Before, its line breaks were dropped:
    "Q: is it?\nAnswer:" was read as "Q: is it?Answer:"."""
    p = tmp_path / "t.csv"
    p.write_bytes(b'prompt,choices,answer\r\n"Q: is it?\nAnswer:",yes|no,0\r\n"Line one\r\nline two:",yes|no,1\r\n')
    assert [e.prompt for e in load_task(TaskSpec(str(p))).examples] == ["Q: is it?\nAnswer:", "Line one\nline two:"]
    p.write_text('prompt,choices,answer\n"a\nb",x|y,0\n"c",x|y\n')
    with pytest.raises(TaskFormatError, match="line 4 has 2 fields but the header has 3"):
        load_task(TaskSpec(str(p)))
    for sep in (";", "\t"):  # a spreadsheet set to a decimal comma separates with semicolons; or tabs
        p.write_text(sep.join(["prompt", "choices", "answer"]) + "\n" + sep.join(["Is 1,5 > 1?", "yes|no", "0"]) + "\n")
        assert [(e.prompt, e.choices, e.answer) for e in load_task(TaskSpec(str(p))).examples] == [
            ("Is 1,5 > 1?", (" yes", " no"), 0)]
    tsv = tmp_path / "t.tsv"  # tab-separated under its own suffix: before, "unknown task format '.tsv'"
    tsv.write_text("prompt\tchoices\tanswer\nIs 1,5 > 1?\tyes|no\t0\n")
    assert load_task(TaskSpec(str(tsv))).examples[0].choices == (" yes", " no")


def test_prompt_template_builds_the_prompt_from_columns(tmp_path):
    """Hub datasets and most files hold a bare question: a template gives it the "Question: ...\\nAnswer:" frame."""
    p = tmp_path / "t.csv"
    p.write_text('question,context,choices,answer\n"Is 2 even?","Arithmetic.",yes|no,yes\n"Is 3 even?","Odd.",yes|no,no\n')
    task = load_task(TaskSpec(str(p), prompt_template="{context}\\nQuestion: {question}\\nAnswer:"))
    assert [e.prompt for e in task.examples] == ["Arithmetic.\nQuestion: Is 2 even?\nAnswer:",
                                                 "Odd.\nQuestion: Is 3 even?\nAnswer:"]
    assert task.examples[0].choices == (" yes", " no") and [e.answer for e in task.examples] == [0, 1]
    assert task.digest != load_task(TaskSpec(str(p), prompt_template="{question}")).digest  # another task to the cache
    with pytest.raises(TaskFormatError, match=r"t.csv: line 2: the prompt template names 'topic', not a column \(columns: "
                                              r"\['answer', 'choices', 'context', 'question'\]\)"):
        load_task(TaskSpec(str(p), prompt_template="{topic}: {question}"))
    with pytest.raises(TaskFormatError, match="a prompt template applies to JSONL, CSV, JSON-array, Parquet and hf: tasks"):
        load_task(TaskSpec("fever", prompt_template="{input}"))
    for bad in ("Answer:", "Q: {}", "Q: {question"):  # no column named, a positional field, an unclosed brace
        with pytest.raises(ConfigError, match=f"prompt template {re.escape(repr(bad))} "):
            TaskSpec(str(p), prompt_template=bad)
    with pytest.raises(ConfigError, match=r"\{question.upper\} reads an attribute, which no column has"):
        TaskSpec(str(p), prompt_template="Q: {question.upper}")  # it filled "Q: <built-in method upper of str ...>"
    nested = tmp_path / "nested.jsonl"  # a hub row's column may hold a mapping: an item of it is read by its key
    write_jsonl(nested, [{"q": {"text": "Is 2 even?", "id": 7}, "choices": ["yes", "no"], "answer": 0}])
    assert load_task(TaskSpec(str(nested), prompt_template="{q[text]}\\nAnswer:")).examples[0].prompt == \
        "Is 2 even?\nAnswer:"


def test_fixed_choices_serve_every_row_of_a_task_without_a_choices_column(tmp_path):
    """BoolQ, SST-2 and other classification sets on the hub hold a label, not choices: before, they could not load."""
    p = tmp_path / "boolq.jsonl"
    rows = [{"passage": "Cats purr.", "question": "do cats purr", "label": 1},
            {"passage": "Fish swim.", "question": "do fish fly", "label": 0},
            {"passage": "Birds fly.", "question": "do birds fly", "label": "yes"},
            {"passage": "Stones sink.", "question": "do stones float", "label": False}]  # google/boolq's answers
    write_jsonl(p, rows)
    spec = TaskSpec(str(p), answer_col="label", fixed_choices="no|yes",
                    prompt_template="{passage}\\nQuestion: {question}?\\nAnswer:")
    task = load_task(spec)
    assert [(e.prompt.splitlines()[1], e.choices, e.answer) for e in task.examples] == [
        ("Question: do cats purr?", (" no", " yes"), 1), ("Question: do fish fly?", (" no", " yes"), 0),
        ("Question: do birds fly?", (" no", " yes"), 1), ("Question: do stones float?", (" no", " yes"), 0)]
    for same in ('["no", "yes"]', " no | yes "):  # a JSON list, or spaces typed around the |: the same task
        assert load_task(TaskSpec(str(p), answer_col="label", fixed_choices=same,
                                  prompt_template=spec.prompt_template)).digest == task.digest
    write_jsonl(p, [{**rows[0], "label": 2}])
    with pytest.raises(TaskFormatError, match="line 1: answer index 2 is out of range for 2 choices"):
        load_task(spec)
    write_jsonl(p, [{"passage": "Cats purr.", "question": "do cats purr"}])
    with pytest.raises(TaskFormatError, match=r"line 1: no answer column 'label' \(columns: \['passage', 'question'\]\)"):
        load_task(spec)
    with pytest.raises(ConfigError, match="fixed choices 'yes' must be at least 2, separated by \\|"):
        TaskSpec(str(p), fixed_choices="yes")
    with pytest.raises(TaskFormatError, match="fixed choices applies to JSONL, CSV, JSON-array, Parquet and hf: tasks"):
        load_task(TaskSpec("fever", fixed_choices="no|yes"))


def test_digit_answers_that_are_choice_texts_are_read_as_the_text(tmp_path, caplog):
    # "How many legs has a spider? 6|8|10" with answer 8 names the choice "8", not index 8 (out of range);
    # "2|1|0" with answer 2 names "2" (index 0), not index 2 ("0"), and the file gets one warning for it.
    p = tmp_path / "t.csv"
    p.write_text('prompt,choices,answer\n"Legs of a spider?",6|8|10,8\n"Two?",2|1|0,2\n"Pick",a|b|c,2\n')
    with caplog.at_level("WARNING", logger="laser_core.records"):
        task = load_task(TaskSpec(str(p)))
    assert [e.answer for e in task.examples] == [1, 0, 2]
    assert "1 answers could name two choices, as one choice's text and as another's index (first: t.csv: line 3)" \
        in caplog.text
    caplog.clear()
    p = tmp_path / "t.jsonl"  # a JSON number is always an index, and warned about where it is also a choice's text
    p.write_text('{"prompt": "Two?", "choices": [2, 1, 0], "answer": 2}\n'
                 '{"prompt": "Pick", "choices": ["a", "b"], "answer": 1}\n')
    with caplog.at_level("WARNING", logger="laser_core.records"):
        assert [e.answer for e in load_task(TaskSpec(str(p))).examples] == [2, 1]
    assert "1 answers could name two choices" in caplog.text and "(first: t.jsonl: line 1)" in caplog.text
    p.write_text('{"prompt": "Legs of a spider?", "choices": [6, 8, 10], "answer": 8}\n')
    with pytest.raises(TaskFormatError, match="answer index 8 is out of range for 3 choices \\('8' is a choice's text: "
                                              "write the answer as the string \"8\" to mean it\\)"):
        load_task(TaskSpec(str(p)))
    caplog.clear()  # an answer given by a label ("B") or a mark names one choice: no warning, though choices are digits
    write_jsonl(p, [{"prompt": "Bigger?", "choices": {"text": ["1", "2"], "label": ["A", "B"]}, "answer": "B"},
                    {"prompt": "Count?", "choices": {"choices": ["2", "0", "1"], "labels": [0, 0, 1]}}])
    with caplog.at_level("WARNING", logger="laser_core.records"):
        assert [e.answer for e in load_task(TaskSpec(str(p))).examples] == [1, 2]
    assert "could name two choices" not in caplog.text


def test_multiple_choice_fast_path_equals_summed_logprob_of_full_forward(tiny_lm):
    lm = tiny_lm("llama")
    tok = lm.tokenizer
    ex = [Example("Is the number 4 even? Answer:", (" yes", " no"), 0),
          Example("The capital of France is", (" Paris", " blue"), 0)]
    assert all(len(tok(c, add_special_tokens=False).input_ids) == 1 for e in ex for c in e.choices)
    multi = [Example(e.prompt, e.choices + (" true false",), e.answer) for e in ex]  # forces the general path
    fast, slow = evaluate(lm, ex), evaluate(lm, multi)
    gold_nll = []
    with torch.no_grad():
        for e, pred in zip(ex, fast.predictions):
            p = tok(e.prompt).input_ids
            scores = []
            for c in e.choices:
                ids = torch.tensor([p + tok(c, add_special_tokens=False).input_ids])
                logp = torch.log_softmax(lm.model(ids).logits[0, -2], -1)
                scores.append(float(logp[ids[0, -1]]))
            assert pred == max(range(2), key=lambda j: scores[j])
            gold_nll.append(-scores[e.answer])
    assert fast.log_loss == pytest.approx(sum(gold_nll) / len(gold_nll), abs=1e-4)
    assert abs(fast.log_loss - slow.log_loss) < 1e-4  # gold is a one-token choice in both


def test_choices_are_scored_with_the_tokens_they_have_after_the_prompt():
    """A Llama 2 style tokenizer reads " yes" alone as ['▁', '▁yes']: each choice was scored one stray '▁' longer
    than it is after the prompt, and one-token choices missed the single-token path."""
    from conftest import build_tiny, make_tokenizer
    from laser_core.forward import build_sequences
    from laser_core.models import from_module

    tok = make_tokenizer(dummy_prefix=True)
    assert tok.convert_ids_to_tokens(tok(" yes", add_special_tokens=False).input_ids) == ["▁", "▁yes"]
    lm = from_module(build_tiny("llama", tok), tok)
    one = [Example("Is the number 4 even? Answer:", (" yes", " no"), 0),
           Example("Q: What colour is the sky? A:", (" blue", " red"), 0)]
    multi = [Example("The capital of France is", (" Paris", " blue"), 0),
             Example("Q: What colour is the sky? A:", (" blue green", " red"), 0)]
    assert build_sequences(lm, one)[1]  # one token each, after the prompt
    for examples in (one, multi):
        res = evaluate(lm, examples)
        with torch.no_grad():
            for e, logps in zip(examples, res.choice_logprobs):
                p = tok(e.prompt).input_ids
                for c, got in zip(e.choices, logps):
                    ids = tok(e.prompt + c).input_ids  # prompt and choice tokenised together, as in a text
                    assert ids[:len(p)] == p
                    logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0], -1)
                    want = sum(float(logp[i - 1, ids[i]]) for i in range(len(p), len(ids)))
                    assert got == pytest.approx(want, abs=1e-4), (e.prompt, c)


def test_a_masked_lm_scores_each_choices_first_token_after_the_prompt_and_says_when_choices_tie(caplog):
    """With a Llama 2 style tokenizer every choice alone starts with '▁': a masked LM compared the same logit for
    all choices and always predicted the first, without a word."""
    import contextvars

    from conftest import build_tiny, make_tokenizer
    from laser_core.forward import build_sequences
    from laser_core.models import from_module

    tok = make_tokenizer(dummy_prefix=True)
    lm = from_module(build_tiny("roberta", tok), tok)
    distinct = [Example("Is the number 4 even? Answer:", (" yes", " no"), 0),
                Example("Q: What colour is the sky? A:", (" blue", " red"), 0)]
    with caplog.at_level("WARNING", logger="laser_core"):
        seqs = build_sequences(lm, distinct)[0]
        assert [tok.convert_ids_to_tokens(s.rows) for s in seqs] == [["▁yes", "▁no"], ["▁blue", "▁red"]]
        assert not caplog.records
        tied = distinct + [Example("Is the number 13 even? Answer:", (" true claim", " true false"), 1)]
        for _ in range(2):  # two runs (a CLI process, or a dashboard job: a thread, with an empty context)
            contextvars.Context().run(lambda: [build_sequences(lm, tied) for _ in range(3)])  # 3 candidates
    said = ("1 of 3 questions have choices that start with the same token: a masked LM scores a choice by its first "
            "token at the <mask>, so those choices tie and the first of them is always predicted; use a causal LM "
            "for this task")
    assert [r.getMessage() for r in caplog.records] == [said, said]  # once per run
    from laser_core.checks import masked_ties
    assert masked_ties(lm, tied) == said and masked_ties(lm, distinct) is None  # said before a run, as pages do
    assert masked_ties(from_module(build_tiny("llama", tok), tok), tied) is None  # a causal LM scores whole choices


def test_generation_matches_generated_text_not_the_prompt(tiny_lm):
    lm = tiny_lm("llama")
    ex = [Example("The capital of France is Paris. The capital of France is", targets=(" Paris",))]
    res = evaluate(lm, ex, max_new_tokens=3)
    generated = res.predictions[0]
    assert res.correct[0] == ("paris" in generated.lower())  # the prompt's "Paris" does not count
    assert res.log_loss > 0


def test_generation_decodes_the_same_text_in_batches_of_any_size(tiny_lm):
    """Prompts of five lengths, left-padded into one batch, decode as they do one per batch; batches hold as many
    rows as fit the token budget with their decoded tokens."""
    from laser_core.evaluate import generation_batches
    lm = tiny_lm("llama")
    ex = [Example(f"Say{' so' * (i % 5)} {i}:", targets=(" x",)) for i in range(12)]
    alone = evaluate(lm, ex, max_new_tokens=4, max_tokens=1)
    together = evaluate(lm, ex, max_new_tokens=4)
    assert together.predictions == alone.predictions and together.log_loss == pytest.approx(alone.log_loss, abs=1e-4)
    lengths = [10, 3, 7, 7, 12]
    assert generation_batches(lm, lengths, 4, 8192) == [[4, 0, 2, 3, 1]]  # longest first
    assert generation_batches(lm, lengths, 4, 32) == [[4, 0], [2, 3], [1]]  # 2 x (12 + 4) fit 32; 3 x (7 + 4) do not
    assert generation_batches(lm, lengths, 4, 1) == [[4], [0], [2], [3], [1]]  # a prompt past the budget goes alone


def test_generation_stops_early_once_the_best_is_out_of_reach_and_never_while_it_can_be_tied(tiny_lm):
    """Early stop was a no-op on generation tasks: every candidate decoded every prompt. Now it is checked after
    each batch of prompts, with the rule multiple choice has: stop only where even every remaining answer right
    would not reach the best accuracy."""
    lm = tiny_lm("llama")
    ex = [Example(f"Say{' so' * (i % 5)} {i}:", targets=(" x",)) for i in range(12)]
    said = evaluate(lm, ex, max_new_tokens=4).predictions
    ex = [Example(e.prompt, targets=(" " + p.strip()[0],)) for e, p in zip(ex, said)]  # every answer right...
    ex[4] = Example(ex[4].prompt, targets=(" @",))  # ...but one, among the longest prompts: decoded first
    full = evaluate(lm, ex, max_new_tokens=4, max_tokens=40)  # two prompts a batch
    assert full.accuracy == pytest.approx(11 / 12) and not full.stopped_early
    for best in (0.0, 11 / 12):  # reachable, or tied at best: decoded to the end, log-loss and all
        same = evaluate(lm, ex, max_new_tokens=4, max_tokens=40, beat=(best, 0.0))
        assert not same.stopped_early and (same.accuracy, same.log_loss, same.predictions) == \
            (full.accuracy, pytest.approx(full.log_loss, abs=1e-6), full.predictions)
    stopped = evaluate(lm, ex, max_new_tokens=4, max_tokens=40, beat=(1.0, 0.0))  # the one miss is out of reach
    decoded = [i for i, p in enumerate(stopped.predictions) if p]
    assert stopped.stopped_early and 4 in decoded and len(decoded) < len(ex)
    assert [stopped.predictions[i] for i in decoded] == [full.predictions[i] for i in decoded]
    assert stopped.accuracy == pytest.approx((len(decoded) - 1) / 12)


def test_answer_match_rules_tell_a_whole_answer_from_a_part_of_a_word():
    """LASER's rule (contains) credits any generated line holding the answer's letters: qa_wikidata's blood type
    "O" in "a rare blood type", "Japan" in "Japanese". The others ask for whole words, the start, or the line."""
    from laser_core.cli_args import parser, specs_of
    from laser_core.answers import MATCH_RULES, answer_matches
    cases = {  # (generated line, accepted answer): contains, word, starts, exact
        ("10 people", " 1"): (True, False, False, False),
        ("a rare blood type", " O"): (True, False, False, False),
        ("a Japanese-style house", " Japan"): (True, False, False, False),
        ("the Republic of France.", " France"): (True, True, False, False),
        ("English, which is spoken", " English"): (True, True, True, False),
        ("C++ and more", "c++"): (True, True, True, False),
        ("  ENGLISH ", "English"): (True, True, True, True),
        ("Spain", " France"): (False, False, False, False),
    }
    assert list(MATCH_RULES) == ["contains", "word", "starts", "exact"]
    for (line, target), want in cases.items():
        assert tuple(answer_matches(line, (" x", target), rule) for rule in MATCH_RULES) == want, (line, target)
    with pytest.raises(ConfigError, match="unknown answer match 'fuzzy'; known: contains, word, starts, exact"):
        TaskSpec("qa_wikidata", match="fuzzy")
    assert specs_of(parser().parse_args(["eval", "--task", "qa_wikidata", "--match", "starts"]))[1].match == "starts"
    assert TaskSpec().match == "contains"  # LASER's, as the README's tables were made


def test_a_generation_answer_longer_than_max_new_tokens_is_said_before_and_during_a_run(tiny_lm, caplog, tmp_path):
    """Decoding stops at max_new_tokens: a question whose every accepted answer is longer can never be right. Before,
    its accuracy was 0 without a word, and only the library could set the length."""
    from laser_core.cli_args import parser, specs_of
    from laser_core.checks import unreachable_targets
    from laser_core.sequences import choice_ids, prompt_ids
    lm = tiny_lm("llama")
    long = " the capital of France is Paris and the capital of Italy is Rome"
    ex = [Example("The capital of France is", targets=(" Paris",)),
          Example("Name two capitals:", targets=(long, long + " and more"))]
    need = len(choice_ids(lm, prompt_ids(lm, ex[1].prompt), ex[1].prompt, long))
    assert need > 4
    said = unreachable_targets(lm, ex, need - 1)
    assert said.startswith(f"1 of 2 questions have no accepted answer that fits in {need - 1} generated tokens "
                           f"(the longest of them needs {need})")
    assert unreachable_targets(lm, ex, need) is None
    assert unreachable_targets(lm, [Example("Q?", (" a", " b"), 0)], 1) is None  # multiple choice: nothing decoded
    with caplog.at_level("WARNING"):
        evaluate(lm, ex, max_new_tokens=need - 1)
    assert said in caplog.text
    args = parser().parse_args(["eval", "--task", str(tmp_path / "t.jsonl"), "--max-new-tokens", "40"])
    assert specs_of(args)[1].max_new_tokens == 40


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_a_question_longer_than_the_models_context_is_refused_clearly_and_one_that_just_fits_runs(tiny_lm, arch):
    """Before, GPT-2 and RoBERTa failed mid-run with a bare IndexError / 'index 260 is out of bounds', and a rotary
    model scored positions it was never trained on."""
    from laser_core.checks import context_overflow
    lm = tiny_lm(arch)

    def question(k: int) -> Example:
        return Example("Is it" + " so" * k + "?", (" yes", " no"), 0)
    k = 0
    while context_overflow(lm, [question(k + 1)]) is None:  # the longest question that fits
        k += 1
    assert k > 20  # (a few tokens per " so")
    evaluate(lm, [question(k), question(1)])  # runs: the limit is not too lax for its position embeddings
    said = context_overflow(lm, [question(k + 1), question(1)])
    assert said.startswith(f"1 of 2 questions are longer than the model's context of {lm.context_limit} tokens")
    with pytest.raises(ConfigError, match=re.escape(said)):
        evaluate(lm, [question(k + 1), question(1)])
    if arch != "roberta":  # generation: the prompt and max_new_tokens
        gen = [Example("Is it" + " so" * (k - 8) + "?", targets=(" yes",))]
        assert context_overflow(lm, gen, max_new_tokens=4) is None and context_overflow(lm, gen, 40) is not None
        with pytest.raises(ConfigError, match="longer than the model's context"):
            evaluate(lm, gen, max_new_tokens=40)


def test_a_tokenizer_without_pad_token_pads_with_eos_and_scores_as_unpadded(tiny_dirs):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from laser_core.models import from_module

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    tok.pad_token = None  # as gpt2's and many hub tokenizers ship
    lm = from_module(LlamaForCausalLM.from_pretrained(tiny_dirs["llama"]), tok)
    assert lm.tokenizer.pad_token == "</s>" and lm.pad_id == tok.eos_token_id
    ex = [Example("Is the number 4 even? Answer:", (" yes", " no true"), 0),
          Example("Q: What colour is the sky? A:", (" blue green", " red"), 1),
          Example("The capital of France is", (" Paris", " blue"), 0)]
    together, alone = evaluate(lm, ex), [evaluate(lm, [e]) for e in ex]
    assert together.predictions == [a.predictions[0] for a in alone]
    assert together.log_loss == pytest.approx(sum(a.log_loss for a in alone) / len(ex), abs=1e-4)
    tok.pad_token = tok.eos_token = tok.unk_token = None
    assert lm.pad_id == 0  # nothing to borrow: any id will do, the mask hides it
