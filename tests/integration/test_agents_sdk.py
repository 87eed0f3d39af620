"""The OpenAI Agents SDK (openai-agents) runs an agent turn with a function tool against
the fused model of `make serve`'s default config, over real HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.fixtures.processes import free_port, launch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server_url(model_dirs) -> Iterator[str]:
    port = free_port()
    args = ["server", "serve", "--config", "config.yaml", "--port", str(port)]
    proc, url = launch(args, port, env=dict(os.environ))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def test_an_agent_calls_its_function_tool_and_answers(server_url):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no export to OpenAI's servers
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        asked.append(city)
        return f"18C and sunny in {city}"

    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIChatCompletionsModel(model="fusion", openai_client=client),
        # the first turn must call the tool; the SDK then resets tool_choice to auto
        model_settings=ModelSettings(tool_choice="required", max_tokens=80),
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert asked and asked[0].strip().lower() == "paris"
    assert isinstance(result.final_output, str) and result.final_output.strip()


async def test_an_agent_on_the_responses_api_calls_its_tool(server_url):
    """The SDK's default model (its Responses API model) against /v1/responses."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        asked.append(city)
        return f"18C and sunny in {city}"

    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model="fusion", openai_client=client),
        model_settings=ModelSettings(tool_choice="required", max_tokens=80, store=False),
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert asked and asked[0].strip().lower() == "paris"
    assert isinstance(result.final_output, str) and result.final_output.strip()
