"""OpenAI's chat completions on the wire: the request the API accepts and forwards, and the responses and
stream chunks an inference backend returns. Shared by the API and the embedded inference server, so both refuse
the same requests with the same envelope.

What is not listed here is refused (400 `unknown_parameter` naming it), never silently ignored.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The caller's project, which the API names to the inference backend (its per-project share of the waiting line);
# the backend trusts it because the request carries the shared secret.
PROJECT_HEADER = "x-qlora-project"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Closed):
    type: Literal["text"]
    text: str


class ChatMessage(_Closed):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="`developer` is read as `system`.")
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64, description="Accepted for OpenAI compatibility; not shown to the model.")

    def as_template_message(self) -> dict[str, str]:
        """The message as the chat template takes it: a system/user/assistant role and plain text."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Closed):
    include_usage: bool = Field(False, description="Send a last chunk with the token counts.")


class ChatCompletionCreate(_Closed):
    model: str = Field(description="A base model id, a fine-tuned model (`ft:...`) of your project, or one of its checkpoint models.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (deprecated by OpenAI for max_completion_tokens).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation ends before the first one.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="Same seed, same request, same model: the same sampled answer. A signed 64-bit integer.")
    n: int = Field(1, ge=1, le=1, description="Only 1 choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="Accepted for OpenAI compatibility (an end-user id); not used.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string may not be empty")
        return value

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionCreate:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def token_limit_error(self, ceiling: int) -> tuple[str, str] | None:
        """(param, message) when the request asks for more tokens than the deployment's ceiling
        (QLORA_CHAT_MAX_TOKENS), else None: the API and the embedded server refuse it alike, as a 400."""
        if self.token_limit is None or self.token_limit <= ceiling:
            return None
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return param, f"{param} is {self.token_limit}; this service generates at most {ceiling} tokens per request."

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(id: str, created: int, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """A stream chunk: a delta of the one choice, or (delta None) the usage chunk, which has no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
            "choices": choices, "usage": usage_counts}
