"""OpenAI's request bodies as types: what the proxy accepts, checked before it spends anything.

The fields are those OpenAI documents and llama_cpp.server reads, with OpenAI's types and ranges
(a string where a number belongs, a `NaN`, `n: 2` or `top_logprobs: 99999` is refused here with
a 400 naming the field, instead of a 500 from the backend or an answer that ignores it). Fields
not listed are dropped: the backend is sent exactly what was checked. Amplifying fields are
bounded: `top_logprobs` at OpenAI's 20, completions' `logprobs` at 5, `n` and `best_of` at 1,
stop sequences at 16 of 1000 characters. The llama_cpp extensions offered (`top_k`, `min_p`,
`repeat_penalty`, `mirostat_*`, `min_tokens`) are checked like the rest; `grammar` and `suffix`
are refused (`REFUSED`): a grammar llama.cpp cannot parse killed the model server, and
`response_format` and `tools` already give constrained output with grammars the server makes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1000  # each is checked against the text after every token
MAX_LOGIT_BIAS = 1024
TOP_K_MAX = 1 << 20  # more than any vocabulary; llama.cpp takes a 32-bit int
INT64 = 1 << 63


Temperature = Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(strict=True, ge=-2, le=2, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
BiasValue = Annotated[float, Field(strict=True, ge=-100, le=100, allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True, ge=0)]
TopK = Annotated[int, Field(strict=True, ge=0, le=TOP_K_MAX)]
RepeatPenalty = Annotated[float, Field(strict=True, gt=0, le=10, allow_inf_nan=False)]
Seed = Annotated[int, Field(strict=True, ge=-INT64, lt=INT64)]
TopLogprobs = Annotated[int, Field(strict=True, ge=0, le=20)]
TextLogprobs = Annotated[int, Field(strict=True, ge=0, le=5)]
Mirostat = Annotated[int, Field(strict=True, ge=0, le=2)]
One = Annotated[int, Field(strict=True, ge=1, le=1)]
StopText = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)]
TokenId = Annotated[StrictStr, Field(pattern=r"^[0-9]{1,9}$")]  # a token id, as OpenAI's keys
Bias = Annotated[dict[TokenId, BiasValue], Field(max_length=MAX_LOGIT_BIAS)]
# OpenAI's rule for function names; it also keeps them out of the way of grammars and prompts.
FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# Fields llama_cpp.server would take that the proxy does not offer, and what to send instead.
REFUSED = {
    "grammar": "'grammar' is not accepted; use response_format with a json_schema, or tools, for "
    "constrained output.",
    "suffix": "'suffix' (fill in the middle) is not served; send the whole prompt.",
    "logit_bias_type": "'logit_bias_type' is not accepted; logit_bias keys are token ids.",
}


class _Checked(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Checked):
    type: Literal["text"]
    text: StrictStr


class ImageUrl(_Checked):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Checked):
    type: Literal["image_url"]
    image_url: ImageUrl


Content = StrictStr | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class FunctionCall(_Checked):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Checked):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Checked):
    # OpenAI's newer "developer" role means what "system" means to a chat template.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    function_call: FunctionCall | None = None


class FunctionSpec(_Checked):
    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Checked):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Checked):
    name: FunctionName


class NamedTool(_Checked):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(_Checked):
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Checked):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama_cpp's own spelling


class StreamOptions(_Checked):
    include_usage: StrictBool | None = None


class _Sampling(_Checked):
    """What chat and text completions share."""

    model: StrictStr | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    min_p: Probability | None = None
    top_k: TopK | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: RepeatPenalty | None = None
    logit_bias: Bias | None = None
    seed: Seed | None = None
    n: One | None = None
    user: StrictStr | None = None
    min_tokens: Count | None = None
    mirostat_mode: Mirostat | None = None
    mirostat_tau: Positive | None = None
    mirostat_eta: Positive | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    functions: list[FunctionSpec] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None


TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class TextRequest(_Sampling):
    prompt: Prompt
    echo: StrictBool | None = None
    logprobs: TextLogprobs | None = None
    best_of: One | None = None


class EmbeddingRequest(_Checked):
    model: StrictStr | None = None
    input: Prompt
    user: StrictStr | None = None
