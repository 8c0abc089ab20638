"""The OpenAI Agents SDK, unchanged, against the embedded model: its default model class calls
/v1/responses (with tools, tool_choice, and the function_call / function_call_output items of the loop),
run and streamed. tool_choice "required" makes the 135M model call the tool; the SDK resets it to auto
after the call, and the model then answers in text."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

agents = pytest.importorskip("agents")

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(platform):
    """A fresh agent per test: its AsyncOpenAI client belongs to the event loop of one asyncio.run."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK would send traces to api.openai.com
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}."

    client = openai.AsyncOpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)
    model = OpenAIResponsesModel(model=platform.model, openai_client=client)
    a = Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather], model=model,
              model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60,
                                           parallel_tool_calls=False))
    return a, calls


def _tool_items(result) -> tuple[list, list]:
    from agents.items import ToolCallItem, ToolCallOutputItem

    called = [i for i in result.new_items if isinstance(i, ToolCallItem)]
    answered = [i for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    return called, answered


def test_an_agent_run_calls_the_tool_and_answers(agent):
    from agents import Runner

    a, calls = agent
    calls.clear()
    result = asyncio.run(Runner.run(a, "What is the weather in Paris?", max_turns=3))
    called, answered = _tool_items(result)
    assert called and answered and calls
    assert isinstance(json.loads(called[0].raw_item.arguments)["city"], str)
    assert "Sunny" in str(answered[0].output)
    assert isinstance(result.final_output, str)


def test_a_streamed_agent_run_gets_the_same_loop(agent):
    from agents import Runner

    a, calls = agent
    calls.clear()

    async def go():
        result = Runner.run_streamed(a, "What is the weather in Rome?", max_turns=3)
        kinds = [ev.type async for ev in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(go())
    called, answered = _tool_items(result)
    assert called and answered and calls
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert isinstance(result.final_output, str)
