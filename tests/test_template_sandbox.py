"""A user's chat template renders in a child process under a time limit, a memory cap and an output cap; the process
that asked (the web server, the CLI) never runs it. Each test has a time limit: a template is a program."""

from __future__ import annotations

import time

import pytest

import dataset_render
import template_sandbox
from workspace import UserError

TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}{{ bos_token }}"

pytestmark = pytest.mark.timeout(120, method="thread")


@pytest.fixture
def tokenizer(demo_tokenizer):
    template = demo_tokenizer.chat_template
    yield demo_tokenizer
    demo_tokenizer.chat_template = template


def test_a_user_template_renders_as_transformers_would_but_in_another_process(tokenizer, monkeypatch):
    tokenizer.chat_template = TEMPLATE
    expected = tokenizer.apply_chat_template(TURNS, tokenize=False)
    dataset_render.ensure_chat_template(tokenizer, TEMPLATE)

    def in_process(*args, **kwargs):
        raise AssertionError("the user's template was rendered in this process")

    monkeypatch.setattr(tokenizer, "apply_chat_template", in_process)
    assert dataset_render.render_chat(TURNS, tokenizer) == expected
    assert expected.startswith("<user>Hi") and tokenizer.eos_token in expected


def test_a_built_in_template_renders_in_this_process(tokenizer):
    dataset_render.ensure_chat_template(tokenizer, "chatml")
    assert tokenizer.chat_template not in dataset_render._USER_TEMPLATES


def test_a_template_that_never_ends_is_stopped_at_the_time_limit_and_then_refused_at_once(tokenizer, monkeypatch):
    monkeypatch.setattr(template_sandbox, "RENDER_TIMEOUT_S", 2.0)
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(UserError, match="took more than 2 s to render one conversation"):
        dataset_render.ensure_chat_template(tokenizer, endless)
    assert time.monotonic() - started < 60
    started = time.monotonic()
    with pytest.raises(UserError, match="took more than 2 s"):
        dataset_render.render_chat(TURNS, tokenizer)
    assert time.monotonic() - started < 1


def test_a_template_that_raises_is_a_template_error_and_the_child_keeps_serving(tokenizer):
    raising = "{% if messages[0]['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}ok"
    dataset_render.ensure_chat_template(tokenizer, raising)
    with pytest.raises(template_sandbox.TemplateError, match="no boom"):
        dataset_render.render_chat([{"role": "user", "content": "boom"}], tokenizer)
    assert dataset_render.render_chat(TURNS, tokenizer) == "ok"


def test_a_template_asking_for_more_memory_than_the_cap_is_refused(tokenizer):
    with pytest.raises(UserError, match="needs more than 1024 MiB of memory"):
        dataset_render.ensure_chat_template(tokenizer, "{{ 'x' * 10000000000 }} ")


def test_at_most_kept_children_stay_alive_after_renders_of_several_templates(tokenizer):
    for number in range(template_sandbox.KEPT_CHILDREN + 1):
        dataset_render.ensure_chat_template(tokenizer, f"{number}{{{{ messages[0]['content'] }}}}")
        assert dataset_render.render_chat(TURNS, tokenizer) == f"{number}Hi"
    alive = [child for child in template_sandbox._children.values() if child.process.poll() is None]
    assert len(alive) <= template_sandbox.KEPT_CHILDREN
