"""The core's configuration: the `core:` section of the Corvex YAML file.

Only types and defaults live here; loading (file, CORVEX_CORE_* environment, flags) is
`corvex.config.load_section`. Every field has a default so that `corvex core` with no file
serves the whole catalogue on simulated engines.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class SimulatedEngineConfig(
    msgspec.Struct, tag="simulated", tag_field="backend", forbid_unknown_fields=True
):
    """The deterministic CPU engine. Timings model a GPU: zero them for tests."""

    # Time `start()` takes, as if loading weights (health is NOT_SERVING meanwhile).
    load_ms: float = 0.0
    # Prefill: delay from admission to the first token, plus a per-prompt-token part.
    ttft_ms: float = 40.0
    prefill_ms_per_1k_tokens: float = 5.0
    # Decode: one step emits one token for every running request.
    tpot_ms: float = 12.0
    # Each running request beyond the first makes a step this fraction slower.
    batch_slowdown: float = 0.01
    # Requests decoded together; more wait in the queue.
    max_batch: int = 64
    # Waiting requests beyond which new ones are refused with ENGINE_UNAVAILABLE.
    max_queue: int = 512
    # Length range of an answer the model ends by itself (finish_reason "stop").
    min_answer_tokens: int = 8
    max_answer_tokens: int = 200
    # Vector size of embeddings (requests may ask for fewer with `dimensions`).
    embedding_dimensions: int = 1024
    # Token ids are 0 .. vocab_size - 1 (what logit_bias, stop_token_ids and token-id prompts
    # may name); the answer words have the lowest ids.
    vocab_size: int = 32_000
    # Whether the model reasons before it answers when a request does not say (with
    # reasoning_effort or a chat_template_kwargs thinking switch).
    reasoning: bool = False
    # Mixed into every hash, so two deployments can produce different (still stable) text.
    seed: int = 0


class VllmEngineConfig(msgspec.Struct, tag="vllm", tag_field="backend", forbid_unknown_fields=True):
    """A vLLM `AsyncLLM` engine on this node's GPUs. See docs/deploy-gpu.md."""

    # Hugging Face id or local path of the weights. Weights must already be on disk.
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    enable_prefix_caching: bool | None = None
    max_num_seqs: int | None = None
    # GPUs this engine may use (CUDA_VISIBLE_DEVICES for its workers). None: all.
    devices: list[int] | None = None
    # "generate" for chat models, "embed" for embedding models.
    runner: Literal["generate", "embed"] = "generate"
    # Extra variables for the model's chat template (e.g. {"thinking": false} for models whose
    # template turns reasoning on by default), applied to every request.
    chat_template_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    # vLLM's tool-call parser for the model (`vllm serve --tool-call-parser`): "glm47",
    # "kimi_k2", "minimax_m2", "deepseek_v4", "hermes", ... Requests with tools are refused
    # (400, param tools) when it is not set, as vLLM refuses them.
    tool_call_parser: str | None = None
    # vLLM's reasoning parser (`--reasoning-parser`): "glm45", "kimi_k2", "minimax_m2",
    # "deepseek_v4", "qwen3", ... It splits the model's thinking from its answer (the `reasoning`
    # field) and tells structured outputs where the answer starts. Unset: no split.
    reasoning_parser: str | None = None
    # Passed to vllm's AsyncEngineArgs as given, for arguments not named above.
    engine_args: dict[str, Any] = msgspec.field(default_factory=dict)


EngineConfig = SimulatedEngineConfig | VllmEngineConfig


class EnginesConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Which engine serves each model. Models not listed use `default`; a `default` of null
    means this core serves only the models listed (a GPU node that hosts some of the card)."""

    default: EngineConfig | None = msgspec.field(default_factory=SimulatedEngineConfig)
    models: dict[str, EngineConfig] = msgspec.field(default_factory=dict)

    def for_model(self, model_id: str) -> EngineConfig | None:
        return self.models.get(model_id, self.default)


class ReservedPoolConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The capacity of one reserved offering on this core: how many replicas can exist at once.

    Simulated engines: `replicas` new engine instances. vLLM: `devices`, the GPUs of each
    replica (one list per replica, each as long as the offering's gpus_per_replica), which the
    shared engines must not use; their number is the pool's size.
    """

    replicas: int = 0
    devices: list[list[int]] | None = None
    # What each replica runs. Unset: the model's engine in `core.engines`.
    engine: EngineConfig | None = None


class ReservedConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Reserved endpoints: the capacity pool per offering and the billing period."""

    # Offering id (from the rate card's `reserved:`) → its capacity on this core. An offering
    # without a pool cannot be rented here.
    pools: dict[str, ReservedPoolConfig] = msgspec.field(default_factory=dict)
    # Seconds per billing period. 60 is the pricing page's accrual by the minute; a shorter
    # divisor of 60 is for tests and demos (every offering's price must split into whole
    # nano-USD periods, or the core refuses to start).
    period_s: int = 60
    # How often the billing loop looks at every endpoint; a top-up or a cap change wakes it
    # at once, so a suspended endpoint resumes within this bound.
    tick_s: float = 1.0
    # How long CreateEndpoint waits for the replicas to be ready before it answers STARTING.
    create_wait_s: float = 10.0


class StarterPromotionConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The starter credits a customer claims from the dashboard, once per account."""

    enabled: bool = True
    # USD with at most 2 decimals.
    amount_usd: str = "5.00"
    # Last day a claim is taken, "YYYY-MM-DD" (UTC), inclusive. Empty: no end date.
    ends: str = ""


class CustomersConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Customers (users and sessions, issue 16) and what the dashboard offers them."""

    starter: StarterPromotionConfig = msgspec.field(default_factory=StarterPromotionConfig)
    # How long a sign-in lasts.
    session_ttl_hours: float = 168.0
    # Failed sign-ins per email within the window, beyond which sign-in waits.
    sign_in_failures: int = 10
    sign_in_window_s: float = 900.0
    # Alert webhooks: attempts per delivery and the first wait between them (doubled each time).
    webhook_attempts: int = 5
    webhook_retry_initial_s: float = 2.0
    webhook_timeout_s: float = 10.0
    # Deliver webhooks to loopback, private and link-local addresses too. Off: a customer's
    # URL cannot make the core call its own network (tests and local receivers turn it on).
    webhook_allow_private_addresses: bool = False


class AccountsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Money rules that are policy rather than code."""

    # Credits given to a workspace an operator creates (CreateWorkspace without an amount,
    # like the dev workspace of `make run`), USD with at most 2 decimals. "0" gives none.
    # Customers who sign up get nothing until they claim the starter promotion (`customers`).
    starter_credits_usd: str = "5.00"
    # Smallest top-up (and auto-reload amount) accepted, USD with at most 2 decimals. The
    # pricing page promises credits "in any amount": a cent, unless a payment provider's own
    # minimum charge needs more (then say so on the page).
    min_topup_usd: str = "0.01"
    # Payment provider behind auto-reload: "simulated" (always succeeds, for development)
    # or "none" (auto-reload attempts fail and are recorded).
    payment_provider: Literal["simulated", "none"] = "simulated"
    # Backoff of failed auto-reload attempts: first wait, doubled up to the maximum.
    auto_reload_retry_initial_s: float = 5.0
    auto_reload_retry_max_s: float = 300.0


class JournalConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The durable journal (SQLite in WAL mode under data_dir)."""

    # Most records written in one transaction (one fsync).
    max_batch: int = 1024
    # Take a snapshot of the whole ledger after this many records, so recovery stays short.
    snapshot_every: int = 50_000
    # fsync on every commit. Turn off only for benchmarks that measure what durability costs.
    fsync: bool = True
    # Benchmarks only: no journal at all; nothing survives a restart.
    enabled: bool = True


class PostgresTlsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """TLS on the connection to PostgreSQL. With `ca_file` the server's certificate must be
    signed by it and name the DSN's host (libpq's verify-full); `cert_file`/`key_file` add a
    client certificate for servers that ask for one."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Where money lives. `journal`: this core alone, its SQLite journal in data_dir (what
    `make run` starts). `postgres`: several cores share one ledger in PostgreSQL and spend out
    of leases (docs/deploy-cluster.md)."""

    backend: Literal["journal", "postgres"] = "journal"
    # postgresql://user:password@host:port/database (libpq URI). Prefer the environment
    # (CORVEX_CORE_LEDGER_DSN) to the file for the password.
    dsn: str = ""
    # This core's name in the ledger (its leases and heartbeat). Empty: made once and kept in
    # data_dir/core_id, so a restarted core finds the leases it held before.
    core_id: str = ""
    # Where a charge is durable before the request's final chunk: "postgres" (group commit to
    # the ledger) or "journal" (this core's SQLite journal, shipped to the ledger after).
    charges: Literal["postgres", "journal"] = "postgres"
    # Credit a core leases per workspace ahead of need, USD; while the workspace can spend less
    # than `exact_below_usd`, each admission leases only its own hold.
    lease_credit_usd: str = "1.00"
    exact_below_usd: str = "5.00"
    # The same for a key's monthly token limit.
    lease_tokens: int = 100_000
    exact_below_tokens: int = 500_000
    # A lease not renewed for this long lapses and its credit returns to the workspace.
    lease_ttl_s: float = 30.0
    # How often leases are renewed (and topped up ahead of need), expired leases swept, this
    # core's heartbeat written, and every cached account reloaded from the ledger.
    renew_every_s: float = 5.0
    sweep_every_s: float = 5.0
    heartbeat_every_s: float = 2.0
    resync_every_s: float = 60.0
    # A request whose charge the ledger has not confirmed by then gets 503 (the charge stays
    # queued and is recorded once the ledger is back, unless its lease has lapsed meanwhile).
    charge_timeout_s: float = 10.0
    # Connections to PostgreSQL (the listening connection is one more).
    pool_size: int = 10
    tls: PostgresTlsConfig = msgspec.field(default_factory=PostgresTlsConfig)


class ServerTlsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """TLS on the core's gRPC port: its certificate and key (PEM files). With
    `client_ca_file`, every client (edges, admin tools) must present a certificate signed by
    it (mutual TLS)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class CoreConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The `core:` section."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus /metrics. Port 0 picks a free port; -1 turns the endpoint off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    # Shortest interval between keepalive pings that a client sending no data may use (the
    # edge pings every edge.core_keepalive_s, 30 s by default). More frequent pings are strikes;
    # after two the core closes the connection with GOAWAY `too_many_pings`.
    keepalive_min_ping_interval_s: float = 10.0
    # The price catalogue; only models on it are served.
    rate_card: str = "infrastructure/metronome/config.yaml"
    # Journal and the generated admin token live here.
    data_dir: str = ".corvex/data"
    # Credential of the Accounts service. Empty: read `admin_token` in data_dir, creating it
    # with a random value on first start.
    admin_token: str = ""
    # SIGTERM: seconds in-flight streams get to finish before they are aborted and settled.
    drain_grace_s: float = 30.0
    # Largest request message accepted (gRPC's receive limit). Keep it at least the edge's
    # max_body_bytes: a JSON body becomes a protobuf message of about the same size.
    max_request_bytes: int = 8 * 1024 * 1024
    # Calls in flight at once; beyond it new calls get RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 8192
    # Benchmarks only: skip keys, limits and money entirely (every request is admitted and
    # nothing is charged), to measure what metering costs. Never set this in production.
    benchmark_unmetered: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": JSON lines unless stderr is a terminal.
    log_format: Literal["auto", "json", "text"] = "auto"
    # TLS on the gRPC port. Without it the core listens only on a loopback address, unless
    # allow_plaintext is set (a private network that encrypts for you).
    tls: ServerTlsConfig = msgspec.field(default_factory=ServerTlsConfig)
    allow_plaintext: bool = False
    accounts: AccountsConfig = msgspec.field(default_factory=AccountsConfig)
    customers: CustomersConfig = msgspec.field(default_factory=CustomersConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    engines: EnginesConfig = msgspec.field(default_factory=EnginesConfig)
    reserved: ReservedConfig = msgspec.field(default_factory=ReservedConfig)
