from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hold(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_UNSPECIFIED: _ClassVar[Hold]
    HOLD_REQUIRED: _ClassVar[Hold]
    HOLD_IF_ROOM: _ClassVar[Hold]
    HOLD_NONE: _ClassVar[Hold]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_COMPLETED: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]
    OUTCOME_FAILED: _ClassVar[Outcome]
HOLD_UNSPECIFIED: Hold
HOLD_REQUIRED: Hold
HOLD_IF_ROOM: Hold
HOLD_NONE: Hold
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_COMPLETED: Outcome
OUTCOME_CANCELLED: Outcome
OUTCOME_FAILED: Outcome

class Caller(_message.Message):
    __slots__ = ("tenant", "key_id", "key_tokens_per_minute", "key_requests_per_minute", "key_budget")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    KEY_REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    KEY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key_id: str
    key_tokens_per_minute: int
    key_requests_per_minute: int
    key_budget: str
    def __init__(self, tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., key_tokens_per_minute: _Optional[int] = ..., key_requests_per_minute: _Optional[int] = ..., key_budget: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "caller", "model", "prompt_tokens", "max_tokens", "count_request", "hold")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    caller: Caller
    model: str
    prompt_tokens: int
    max_tokens: int
    count_request: bool
    hold: Hold
    def __init__(self, request_id: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., count_request: _Optional[bool] = ..., hold: _Optional[_Union[Hold, str]] = ...) -> None: ...

class RequestWindow(_message.Message):
    __slots__ = ("limit", "remaining", "reset_seconds")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    limit: int
    remaining: int
    reset_seconds: float
    def __init__(self, limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_seconds: _Optional[float] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reserved_tokens", "estimated_completion_tokens", "enforced", "limit_tokens", "remaining_tokens", "reset_seconds", "held", "requests", "capped", "allowance_tokens")
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CAPPED_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reserved_tokens: int
    estimated_completion_tokens: int
    enforced: bool
    limit_tokens: int
    remaining_tokens: int
    reset_seconds: float
    held: bool
    requests: RequestWindow
    capped: bool
    allowance_tokens: int
    def __init__(self, reserved_tokens: _Optional[int] = ..., estimated_completion_tokens: _Optional[int] = ..., enforced: _Optional[bool] = ..., limit_tokens: _Optional[int] = ..., remaining_tokens: _Optional[int] = ..., reset_seconds: _Optional[float] = ..., held: _Optional[bool] = ..., requests: _Optional[_Union[RequestWindow, _Mapping]] = ..., capped: _Optional[bool] = ..., allowance_tokens: _Optional[int] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("request_id", "caller", "model", "more_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MORE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    caller: Caller
    model: str
    more_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., model: _Optional[str] = ..., more_tokens: _Optional[int] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("capped", "allowance_tokens")
    CAPPED_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    capped: bool
    allowance_tokens: int
    def __init__(self, capped: _Optional[bool] = ..., allowance_tokens: _Optional[int] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "caller", "model", "prompt_tokens", "completion_tokens", "outcome")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    caller: Caller
    model: str
    prompt_tokens: int
    completion_tokens: int
    outcome: Outcome
    def __init__(self, request_id: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("settled", "returned_tokens")
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    RETURNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    settled: bool
    returned_tokens: int
    def __init__(self, settled: _Optional[bool] = ..., returned_tokens: _Optional[int] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("caller",)
    CALLER_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("scope", "limit", "used", "window_seconds")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    scope: str
    limit: int
    used: int
    window_seconds: int
    def __init__(self, scope: _Optional[str] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., window_seconds: _Optional[int] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("windows",)
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[Window]
    def __init__(self, windows: _Optional[_Iterable[_Union[Window, _Mapping]]] = ...) -> None: ...
