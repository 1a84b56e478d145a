"""Managed engines' vLLM flags for real models: context length, tool calling, chat template; from settings and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import overrides
from gateway.engine_process import (
    TOOL_CALL_MARKUP,
    EngineSpec,
    engine_command,
    engine_spec,
    model_context_length,
    tool_call_parser_for,
)
from gateway.settings import EngineSettings, load_settings
from loragate.cli import main as loragate_main
from loragate.cli import make_parser
from tests.fixtures.gateway import TOOLS_CHAT_TEMPLATE
from training.tiny_model import CHAT_TEMPLATE


def _model(tmp_path: Path, config: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> str:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(folder)


def _spec(model: str, **engines: Any) -> EngineSpec:
    return engine_spec(EngineSettings(**engines), model=model, served_model_name="base", port=8000)


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


# -- context length --------------------------------------------------------------------------------------------------


def test_max_model_len_is_the_models_own_capped_by_a_setting(tmp_path: Path, tiny_model: Path) -> None:
    long_context = _model(tmp_path, {"max_position_embeddings": 131072})
    assert _spec(long_context).max_model_len == 8192  # the default cap
    assert _spec(long_context, max_model_len_cap=200_000).max_model_len == 131072
    assert _spec(long_context, max_model_len=4096).max_model_len == 4096  # an explicit value wins
    assert _flag(engine_command(_spec(long_context)), "--max-model-len") == "8192"
    assert _spec(str(tiny_model)).max_model_len == 1024  # the tiny model's config, not the old fixed 512


def test_context_length_is_read_like_vllm_reads_it(tmp_path: Path) -> None:
    assert model_context_length(_model(tmp_path, {"n_positions": 2048})) == 2048
    # A multimodal config nests the language model's; the smallest of the keys present counts.
    nested = {"text_config": {"max_position_embeddings": 32768}, "seq_length": 4096}
    assert model_context_length(_model(tmp_path, nested)) == 4096
    assert model_context_length(_model(tmp_path, {"hidden_size": 64})) is None
    assert model_context_length(str(tmp_path / "no-such-model")) is None
    unknown = _spec(_model(tmp_path, {"hidden_size": 64}))
    assert unknown.max_model_len is None
    assert "--max-model-len" not in engine_command(unknown)  # vLLM derives it


# -- tool calling ----------------------------------------------------------------------------------------------------

TEMPLATES = [
    ("{{ '<tool_call>\\n' + tool_call | tojson + '\\n</tool_call>' }}", "hermes"),  # Qwen2.5 / Hermes
    ("{{ '<tool_call>\\n<function=' + name + '>\\n<parameter=' }}", "qwen3_coder"),
    ("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}", "mistral"),
    ("{{ '<|python_tag|>' + tool_call.name }}", "llama3_json"),
    (CHAT_TEMPLATE, None),  # the tiny model's: no tool markup
]


@pytest.mark.parametrize(("template", "parser"), TEMPLATES, ids=[p or "none" for _, p in TEMPLATES])
def test_tool_call_parser_is_chosen_from_the_chat_template(tmp_path: Path, template: str, parser: str | None) -> None:
    model = _model(tmp_path, {"max_position_embeddings": 4096})
    (Path(model) / "chat_template.jinja").write_text(template)
    assert tool_call_parser_for(model) == parser
    cmd = engine_command(_spec(model))
    assert _flag(cmd, "--tool-call-parser") == parser
    assert ("--enable-auto-tool-choice" in cmd) is (parser is not None)


def test_template_sources_in_order(tmp_path: Path, tiny_model: Path) -> None:
    # In tokenizer_config.json, as a string or as named templates.
    model = _model(tmp_path, {}, {"chat_template": "<tool_call>"})
    assert tool_call_parser_for(model) == "hermes"
    named = _model(tmp_path, {}, {"chat_template": [{"name": "tool_use", "template": "[TOOL_CALLS]"}]})
    assert tool_call_parser_for(named) == "mistral"
    # A checkpoint that declares its response format is read by vLLM's own `hf` parser.
    declared = _model(tmp_path, {}, {"chat_template": "<tool_call>", "response_template": {"fields": {}}})
    assert tool_call_parser_for(declared) == "hf"
    # engines.chat_template (a file or the template text) replaces the model's own.
    assert tool_call_parser_for(str(tiny_model)) is None
    assert tool_call_parser_for(str(tiny_model), str(TOOLS_CHAT_TEMPLATE)) == "hermes"
    assert tool_call_parser_for(str(tiny_model), "{{ '[TOOL_CALLS]' }}") == "mistral"
    spec = _spec(str(tiny_model), chat_template=str(TOOLS_CHAT_TEMPLATE))
    cmd = engine_command(spec)
    assert (_flag(cmd, "--tool-call-parser"), _flag(cmd, "--chat-template")) == ("hermes", str(TOOLS_CHAT_TEMPLATE))
    assert "--enable-auto-tool-choice" in cmd


def test_tool_calling_settings_override_the_choice(tmp_path: Path, tiny_model: Path) -> None:
    hermes = str(tiny_model), {"chat_template": str(TOOLS_CHAT_TEMPLATE)}
    off = engine_command(_spec(hermes[0], tool_call_parser="none", **hermes[1]))
    assert "--tool-call-parser" not in off and "--enable-auto-tool-choice" not in off
    named = engine_command(_spec(str(tiny_model), tool_call_parser="llama3_json"))
    assert _flag(named, "--tool-call-parser") == "llama3_json" and "--enable-auto-tool-choice" in named
    no_auto = engine_command(_spec(hermes[0], enable_auto_tool_choice=False, **hermes[1]))
    assert _flag(no_auto, "--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" not in no_auto
    # extra_args come last, so they can still say anything vLLM accepts.
    extra = engine_command(_spec(str(tiny_model), extra_args=["--max-num-seqs", "8"], extra_env={"A": "1"}))
    assert extra[-2:] == ["--max-num-seqs", "8"]


def test_tools_template_renders_the_tiny_template_when_there_are_no_tools(tiny_model: Path) -> None:
    """The shared engines run with chatml_tools.jinja: every request without tools must see the same prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tools_template = TOOLS_CHAT_TEMPLATE.read_text()
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": "Topic: with shall author"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "More"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert (
                tokenizer.apply_chat_template(
                    messages, chat_template=tools_template, tokenize=False, add_generation_prompt=prompt
                )
                == expected
            )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(
        turns, chat_template=tools_template, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(tools[0]) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        in text
    )
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


# -- the CLI ---------------------------------------------------------------------------------------------------------


def test_serve_flags_become_engine_settings(tmp_path: Path) -> None:
    argv = ["serve", "--base", str(tmp_path), "--max-model-len", "2048", "--tool-call-parser", "hermes"]
    argv += ["--no-enable-auto-tool-choice", "--chat-template", "t.jinja"]
    engines = load_settings(**overrides(make_parser().parse_args(argv))).engines
    assert (engines.max_model_len, engines.tool_call_parser) == (2048, "hermes")
    assert (engines.enable_auto_tool_choice, engines.chat_template) == (False, "t.jinja")
    defaults = load_settings(**overrides(make_parser().parse_args(["serve", "--base", str(tmp_path)]))).engines
    assert (defaults.max_model_len, defaults.max_model_len_cap, defaults.tool_call_parser) == (None, 8192, "auto")
    assert (defaults.enable_auto_tool_choice, defaults.chat_template) == (None, None)


def test_a_too_small_max_model_len_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert loragate_main(["serve", "--base", str(tmp_path), "--max-model-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err == "error: invalid settings (engines.max_model_len): Input should be greater than or equal to 16\n"


VLLM_PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.tool_parsers import ToolParserManager
from vllm.utils.argparse_utils import FlexibleArgumentParser

args = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))
validate_parsed_serve_args(args)
fields = ["max_model_len", "tool_call_parser", "enable_auto_tool_choice", "chat_template", "enable_lora"]
print(json.dumps({
    "args": {key: getattr(args, key) for key in fields},
    "unknown": [p for p in json.loads(sys.argv[2]) if p not in ToolParserManager.list_registered()],
}))
"""


def test_vllm_accepts_the_engine_flags_and_knows_every_parser_we_pick(tiny_model: Path) -> None:
    """The command line, parsed by the installed vLLM's own CLI parser; every auto-picked parser is registered."""
    pytest.importorskip("vllm")
    spec = _spec(str(tiny_model), chat_template=str(TOOLS_CHAT_TEMPLATE))
    parsers = sorted({parser for _, parser in TOOL_CALL_MARKUP} | {"hf"})
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_PARSE, json.dumps(engine_command(spec)[3:]), json.dumps(parsers)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.splitlines()[-1])
    assert parsed["args"] == {
        "max_model_len": 1024,
        "tool_call_parser": "hermes",
        "enable_auto_tool_choice": True,
        "chat_template": str(TOOLS_CHAT_TEMPLATE),
        "enable_lora": True,
    }
    assert parsed["unknown"] == []
