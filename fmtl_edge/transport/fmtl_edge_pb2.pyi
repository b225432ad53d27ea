from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskSpec(_message.Message):
    __slots__ = ("name", "kind", "out_dim", "target_mean", "target_std", "units", "description", "train_samples", "test_samples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUT_DIM_FIELD_NUMBER: _ClassVar[int]
    TARGET_MEAN_FIELD_NUMBER: _ClassVar[int]
    TARGET_STD_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    out_dim: int
    target_mean: float
    target_std: float
    units: str
    description: str
    train_samples: int
    test_samples: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., out_dim: _Optional[int] = ..., target_mean: _Optional[float] = ..., target_std: _Optional[float] = ..., units: _Optional[str] = ..., description: _Optional[str] = ..., train_samples: _Optional[int] = ..., test_samples: _Optional[int] = ...) -> None: ...

class DataInfo(_message.Message):
    __slots__ = ("dataset", "client_id", "n_clients", "seed", "alpha", "max_samples", "image_size", "input_shape", "tasks", "info_json", "label_stats_json")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    N_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    LABEL_STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    client_id: int
    n_clients: int
    seed: int
    alpha: float
    max_samples: int
    image_size: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    info_json: str
    label_stats_json: str
    def __init__(self, dataset: _Optional[str] = ..., client_id: _Optional[int] = ..., n_clients: _Optional[int] = ..., seed: _Optional[int] = ..., alpha: _Optional[float] = ..., max_samples: _Optional[int] = ..., image_size: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., tasks: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ..., info_json: _Optional[str] = ..., label_stats_json: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("hostname", "agent_version", "profile_name", "device_class", "memory_budget_bytes", "round_time_s", "round_energy_j", "meter", "torch_device", "pid", "power_modes", "power_mode", "power_mode_allowed")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    TORCH_DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    POWER_MODES_FIELD_NUMBER: _ClassVar[int]
    POWER_MODE_FIELD_NUMBER: _ClassVar[int]
    POWER_MODE_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    agent_version: str
    profile_name: str
    device_class: str
    memory_budget_bytes: int
    round_time_s: float
    round_energy_j: float
    meter: str
    torch_device: str
    pid: int
    power_modes: _containers.RepeatedScalarFieldContainer[str]
    power_mode: str
    power_mode_allowed: bool
    def __init__(self, hostname: _Optional[str] = ..., agent_version: _Optional[str] = ..., profile_name: _Optional[str] = ..., device_class: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., round_time_s: _Optional[float] = ..., round_energy_j: _Optional[float] = ..., meter: _Optional[str] = ..., torch_device: _Optional[str] = ..., pid: _Optional[int] = ..., power_modes: _Optional[_Iterable[str]] = ..., power_mode: _Optional[str] = ..., power_mode_allowed: bool = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("device", "data", "resume_session_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    device: DeviceInfo
    data: DataInfo
    resume_session_id: str
    def __init__(self, device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., data: _Optional[_Union[DataInfo, _Mapping]] = ..., resume_session_id: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("session_id", "server_id", "heartbeat_interval_s", "heartbeat_timeout_s", "chunk_bytes", "max_update_bytes", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    server_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    chunk_bytes: int
    max_update_bytes: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., server_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id", "state", "work_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: str
    work_id: str
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[str] = ..., work_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("ok", "cancel_work_ids")
    OK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_WORK_IDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    cancel_work_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: bool = ..., cancel_work_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PullWorkRequest(_message.Message):
    __slots__ = ("session_id", "wait_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    wait_s: float
    def __init__(self, session_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class TrainSettings(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "base_lr", "momentum", "weight_decay", "affinity_every", "affinity_divide_by_lr", "device")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BASE_LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_EVERY_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_DIVIDE_BY_LR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    base_lr: float
    momentum: float
    weight_decay: float
    affinity_every: int
    affinity_divide_by_lr: bool
    device: str
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., base_lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., affinity_every: _Optional[int] = ..., affinity_divide_by_lr: bool = ..., device: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("input_shape", "width", "depth", "model", "head_hidden", "signature")
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    width: int
    depth: int
    model: str
    head_hidden: int
    signature: str
    def __init__(self, input_shape: _Optional[_Iterable[int]] = ..., width: _Optional[int] = ..., depth: _Optional[int] = ..., model: _Optional[str] = ..., head_hidden: _Optional[int] = ..., signature: _Optional[str] = ...) -> None: ...

class Work(_message.Message):
    __slots__ = ("work_id", "kind", "job", "round", "tasks", "lr", "config", "measure_affinity", "seed", "time_budget_s", "energy_budget_j", "model", "model_bytes", "model_sha256", "deadline_s", "procedure", "method_config_json", "state_key", "personal", "frozen", "personalised", "power_mode", "loss_weights")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MEASURE_AFFINITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_J_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    PROCEDURE_FIELD_NUMBER: _ClassVar[int]
    METHOD_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_KEY_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    PERSONALISED_FIELD_NUMBER: _ClassVar[int]
    POWER_MODE_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    work_id: str
    kind: str
    job: str
    round: int
    tasks: _containers.RepeatedScalarFieldContainer[str]
    lr: float
    config: TrainSettings
    measure_affinity: bool
    seed: int
    time_budget_s: float
    energy_budget_j: float
    model: ModelInfo
    model_bytes: int
    model_sha256: str
    deadline_s: float
    procedure: str
    method_config_json: str
    state_key: str
    personal: _containers.RepeatedScalarFieldContainer[str]
    frozen: _containers.RepeatedScalarFieldContainer[str]
    personalised: bool
    power_mode: str
    loss_weights: _containers.ScalarMap[str, float]
    def __init__(self, work_id: _Optional[str] = ..., kind: _Optional[str] = ..., job: _Optional[str] = ..., round: _Optional[int] = ..., tasks: _Optional[_Iterable[str]] = ..., lr: _Optional[float] = ..., config: _Optional[_Union[TrainSettings, _Mapping]] = ..., measure_affinity: bool = ..., seed: _Optional[int] = ..., time_budget_s: _Optional[float] = ..., energy_budget_j: _Optional[float] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., model_bytes: _Optional[int] = ..., model_sha256: _Optional[str] = ..., deadline_s: _Optional[float] = ..., procedure: _Optional[str] = ..., method_config_json: _Optional[str] = ..., state_key: _Optional[str] = ..., personal: _Optional[_Iterable[str]] = ..., frozen: _Optional[_Iterable[str]] = ..., personalised: bool = ..., power_mode: _Optional[str] = ..., loss_weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PullWorkReply(_message.Message):
    __slots__ = ("has_work", "work", "reregister", "message", "job_complete", "closing")
    HAS_WORK_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CLOSING_FIELD_NUMBER: _ClassVar[int]
    has_work: bool
    work: Work
    reregister: bool
    message: str
    job_complete: bool
    closing: bool
    def __init__(self, has_work: bool = ..., work: _Optional[_Union[Work, _Mapping]] = ..., reregister: bool = ..., message: _Optional[str] = ..., job_complete: bool = ..., closing: bool = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("session_id", "work_id", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    work_id: str
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., work_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class EvalSums(_message.Message):
    __slots__ = ("loss_sum", "metric_sum", "n")
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    METRIC_SUM_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    loss_sum: float
    metric_sum: float
    n: int
    def __init__(self, loss_sum: _Optional[float] = ..., metric_sum: _Optional[float] = ..., n: _Optional[int] = ...) -> None: ...

class UpdateMeta(_message.Message):
    __slots__ = ("session_id", "work_id", "job", "round", "client_id", "n_samples", "train_loss", "affinity", "affinity_n", "affinity_steps", "device_s", "energy_j", "energy_json", "stopped_by", "peak_memory_bytes", "total_bytes", "sha256", "eval", "sample_passes", "lookahead_passes", "cpu_s", "threads")
    class TrainLossEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class EvalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EvalSums
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EvalSums, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_N_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_S_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JSON_FIELD_NUMBER: _ClassVar[int]
    STOPPED_BY_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_PASSES_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_PASSES_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    work_id: str
    job: str
    round: int
    client_id: int
    n_samples: int
    train_loss: _containers.ScalarMap[str, float]
    affinity: _containers.RepeatedScalarFieldContainer[float]
    affinity_n: int
    affinity_steps: int
    device_s: float
    energy_j: float
    energy_json: str
    stopped_by: str
    peak_memory_bytes: int
    total_bytes: int
    sha256: str
    eval: _containers.MessageMap[str, EvalSums]
    sample_passes: int
    lookahead_passes: int
    cpu_s: float
    threads: int
    def __init__(self, session_id: _Optional[str] = ..., work_id: _Optional[str] = ..., job: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[int] = ..., n_samples: _Optional[int] = ..., train_loss: _Optional[_Mapping[str, float]] = ..., affinity: _Optional[_Iterable[float]] = ..., affinity_n: _Optional[int] = ..., affinity_steps: _Optional[int] = ..., device_s: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_json: _Optional[str] = ..., stopped_by: _Optional[str] = ..., peak_memory_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., eval: _Optional[_Mapping[str, EvalSums]] = ..., sample_passes: _Optional[int] = ..., lookahead_passes: _Optional[int] = ..., cpu_s: _Optional[float] = ..., threads: _Optional[int] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("meta", "chunk")
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    meta: UpdateMeta
    chunk: Chunk
    def __init__(self, meta: _Optional[_Union[UpdateMeta, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: bool = ..., reason: _Optional[str] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("session_id", "work_id", "kind", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    work_id: str
    kind: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., work_id: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: bool = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
