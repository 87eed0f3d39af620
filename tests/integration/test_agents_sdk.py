"""The OpenAI Agents SDK (openai-agents) runs an agent turn with a function tool against
the fused model of `make serve`'s default config, over real HTTP: with its chat
completions model and with its default, the Responses API model."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_an_agent_calls_its_function_tool_and_answers(default_server_url, api):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
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

    client = AsyncOpenAI(base_url=f"{default_server_url}/v1", api_key="none", max_retries=0)
    if api == "chat":
        model = OpenAIChatCompletionsModel(model="fusion", openai_client=client)
    else:
        model = OpenAIResponsesModel(model="fusion", openai_client=client)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=model,
        # the first turn must call the tool; the SDK then resets tool_choice to auto
        model_settings=ModelSettings(tool_choice="required", max_tokens=80, store=False),
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert asked and asked[0].strip().lower() == "paris"
    assert isinstance(result.final_output, str) and result.final_output.strip()
