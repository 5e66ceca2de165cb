"""Configuration: defaults, overridden by ``VITALWIRE_*`` environment variables and CLI options.

docs/configuration.md lists every setting; keep the two in step.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITALWIRE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: str = "sqlite:///./vitalwire.db"
    bus: str = "memory://"
    #: HS256 key for access tokens. Empty: generated once and kept in the store.
    jwt_secret: str = ""
    #: When set, GET /metrics and /metrics.json need ``Authorization: Bearer <metrics_token>``.
    metrics_token: str = ""
    token_ttl_s: float = Field(3600.0, gt=0)
    #: Refresh tokens get new access tokens from POST /auth/refresh until they expire.
    refresh_ttl_s: float = Field(43200.0, gt=0)
    #: SQLite ``PRAGMA synchronous``: NORMAL survives kill -9; FULL survives power loss too.
    sqlite_synchronous: str = "NORMAL"
    #: A write batch holds at most this many rows ...
    batch_max_rows: int = Field(500, ge=1, le=10_000)
    #: ... and waits at most this long for more rows before it commits. 0: commit at once;
    #: rows arriving while a commit runs form the next batch (group commit) - lowest latency.
    batch_max_wait_ms: float = Field(0.0, ge=0, le=50)
    #: Commits start at least this far apart: under load, a batch that forms sooner waits for
    #: the rest of the interval (a full batch does not). Fewer, larger commits cost less CPU per
    #: row (one ack per device and one frame per client per commit); an idle writer commits at
    #: once, so light load pays nothing.
    batch_min_interval_ms: float = Field(2.0, ge=0, le=50)
    #: A device gets at most one (cumulative) ack per this interval; one due sooner is deferred
    #: to the end of it, never dropped. 0: an ack after every commit that stored its readings.
    ack_min_interval_ms: float = Field(20.0, ge=0, le=1000)
    #: Past this many uncommitted rows the server stops reading device frames until the writer
    #: catches up (backpressure through TCP; devices buffer meanwhile).
    max_pending_rows: int = Field(50_000, ge=1000)
    #: Events kept per stream in the bus's recent history (older ones come from the store).
    bus_history: int = Field(1000, ge=1)
    #: Largest frame handled with an error reply; larger ones are rejected alone.
    max_frame_bytes: int = Field(65_536, ge=1024)
    #: Largest frame the server reads at all: past it the socket closes with 1009.
    hard_frame_bytes: int = Field(1_048_576, ge=1024)
    #: Readings per ``readings`` frame.
    max_batch: int = Field(500, ge=1, le=10_000)
    #: First message (hello/auth) must arrive within this time.
    auth_timeout_s: float = Field(10.0, gt=0)
    #: Server ping interval; a peer silent for 3 intervals is closed.
    heartbeat_s: float = Field(15.0, gt=0)
    #: Accept permessage-deflate on WebSockets. Off by default: frames of vital signs are a few
    #: hundred bytes, and compressing each one costs more CPU than sending it
    #: (docs/benchmarks-history.md).
    ws_compression: bool = False
    #: Past this many queued live events, a client's readings coalesce (latest per patient and
    #: set of metrics); alert, command and status events are never coalesced.
    client_queue_soft: int = Field(1000, ge=1)
    #: Live events queued for one client before it is closed as a slow consumer (4008).
    client_queue_max: int = Field(5000, ge=2)
    #: A device sending no reading for 1.5 x this (or its hello's max_silence_s) is marked offline.
    device_max_silence_s: float = Field(30.0, ge=1, le=3600)
    #: An unacknowledged high / medium priority alert escalates after this long (IEC 60601-1-8
    #: leaves the time to the responsible organisation; see docs/alerts.md).
    alert_escalation_high_s: float = Field(60.0, gt=0)
    alert_escalation_medium_s: float = Field(180.0, gt=0)
    #: Vitals older than this do not count in NEWS2.
    news2_max_age_s: float = Field(3600.0, gt=0)
    #: A respiration rate of 0 for this long raises a high-priority ``apnoea`` alert (20 s: the
    #: AAP definition of apnoea and bedside monitors' default; see docs/alerts.md).
    apnoea_delay_s: float = Field(20.0, ge=5, le=60)
    #: How long a break-glass access to a patient outside one's care lasts.
    break_glass_s: float = Field(3600.0, gt=0, le=8 * 3600)
    #: Browser origins allowed on the WebSockets besides the server's own (same host and port).
    #: A request without an Origin header (devices, the SDK, the CLI) is not a browser's.
    allowed_origins: list[str] = Field(default_factory=list)
    #: Messages per second one connection may send (token bucket: rate and burst).
    device_msgs_per_s: float = Field(100.0, gt=0)
    device_msgs_burst: int = Field(500, ge=1)
    client_msgs_per_s: float = Field(20.0, gt=0)
    client_msgs_burst: int = Field(50, ge=1)
    #: Open client connections per user.
    max_connections_per_user: int = Field(20, ge=1)
    #: TLS: serve https/wss with this certificate and key (PEM).
    certfile: str | None = None
    keyfile: str | None = None
    #: Stream events older than this are deleted; a resume from before them gets recovered: false.
    retention_days: float = Field(30.0, gt=0)
    #: Streams one client connection may subscribe to.
    max_streams_per_connection: int = Field(200, ge=1)
    #: Most events one subscribe may replay; beyond it the reply says recovered: false.
    max_replay: int = Field(50_000, ge=1)
    #: Threads that check login passwords, off the event loop (one argon2id check already runs
    #: its 4 lanes on up to 4 threads: about 1.6 cores for 100 ms).
    login_workers: int = Field(1, ge=1, le=64)
    #: Password checks that may wait for a thread; one more login is answered 429 at once.
    login_queue: int = Field(16, ge=0, le=10_000)
    #: Failed logins from one address before it waits: 1 s, doubling to login_address_max_delay_s.
    login_address_free: int = Field(10, ge=1, le=1000)
    #: The longest wait of an address after failed logins (seconds).
    login_address_max_delay_s: float = Field(300.0, ge=1, le=86_400)
    #: Failed logins for one account before it waits: 1 s, doubling to login_account_max_delay_s.
    login_account_free: int = Field(5, ge=1, le=100)
    #: The longest wait of an account (seconds); an address it logged in from is not held.
    login_account_max_delay_s: float = Field(60.0, ge=1, le=3600)
    #: An address or account with no failed login for this long starts again from zero.
    login_forget_s: float = Field(900.0, gt=0, le=86_400)
    #: Addresses (and accounts) the login throttle remembers at most, each (least recent go first).
    login_throttle_keys: int = Field(10_000, ge=1, le=10_000_000)
    #: Largest frame read before a WebSocket authenticated (its hello/auth): past it, close 1009.
    pre_auth_frame_bytes: int = Field(8192, ge=1024, le=1_048_576)
    #: Unauthenticated WebSockets per client address / in total; past either, HTTP 429 / 503.
    pre_auth_per_address: int = Field(64, ge=1)
    pre_auth_total: int = Field(500, ge=1)
    #: The URL browsers use to reach this server behind a proxy (its origin may open WebSockets).
    public_url: str | None = None
    #: Largest HTTP request body: past it, 413 without reading the rest.
    max_body_bytes: int = Field(65_536, ge=1024, le=64 * 1_048_576)
    #: Bytes of events the bus keeps in memory over all streams (oldest evicted first).
    bus_history_bytes: int = Field(256 * 1_048_576, ge=1_048_576)
    #: A reading stamped longer ago than this is stored and shown (marked late) but raises no
    #: live alarm (docs/alerts.md); one stamped more than reading_max_ahead_s ahead is refused.
    reading_late_s: float = Field(60.0, ge=5, le=86_400)
    reading_max_ahead_s: float = Field(5.0, ge=0, le=3600)
    #: This many identity conflicts (two live units, one device id) within the window refuse new
    #: sessions of the identity for identity_cooldown_s (close 4010); the alert lasts the window.
    identity_conflict_max: int = Field(3, ge=1, le=100)
    identity_conflict_window_s: float = Field(300.0, ge=10, le=86_400)
    identity_cooldown_s: float = Field(60.0, ge=1, le=86_400)
    #: MQTT devices (docs/howto-mqtt.md): the broker to bridge, ``mqtt://user:pass@host:port``.
    #: Empty (the default): no bridge.
    mqtt_url: str = Field("", pattern=r"^(mqtt://[^/]+/?)?$")
    #: The bridge's client id: fixed, so the broker keeps its session (and queues its messages)
    #: while it is away. Each node needs its own.
    mqtt_client_id: str = Field("vitalwire", min_length=1, max_length=64)
    #: Topics are ``<prefix>/devices/<device_id>/...``.
    mqtt_topic_prefix: str = Field("vitalwire", min_length=1, max_length=64, pattern=r"^[^#+$]+$")
    #: Subscribe with ``$share/vitalwire/...``: several nodes share the devices' messages.
    mqtt_shared: bool = False
    #: How long the broker keeps the bridge's session (and its queued messages) while it is away.
    mqtt_session_expiry_s: int = Field(3600, ge=0, le=7 * 86_400)
    #: A QoS 1 readings message that leaves a gap after the device's high seq is refused
    #: (``seq_gap``) until the device publishes again from its first reading not acknowledged;
    #: after this long without such a resend its next message is taken, gap and all.
    mqtt_resend_wait_s: float = Field(15.0, ge=1, le=3600)
    #: The edge tier (docs/howto-edge.md). ``upstream``: the cloud this node forwards its streams
    #: to and takes clinicians' requests from (``ws://`` or ``wss://`` host, ``/ws/edge`` is
    #: added when no path is given). Empty (the default): no uplink, this node is a cloud or a
    #: standalone server.
    upstream: str = Field("", pattern=r"^(wss?://[^\s]+)?$")
    #: This node's name at the upstream: the id of the device of kind ``edge`` registered there.
    node_id: str = Field("", pattern=r"^([A-Za-z0-9_.\-]{1,48})?$")
    #: That device's secret at the upstream (or ``upstream_secret_file``: a file holding it).
    upstream_secret: str = ""
    upstream_secret_file: str | None = None
    #: CA certificate(s) (PEM) to trust for a ``wss://`` upstream (a hospital's own CA); unset:
    #: the system trust store (which ``SSL_CERT_FILE`` may name).
    upstream_cafile: str | None = None
    #: Events sent to the upstream and not yet acknowledged by it, at most (flow control).
    upstream_window: int = Field(20_000, ge=100, le=1_000_000)
    #: A call from the upstream (a command, an acknowledgement) is answered within this, or the
    #: cloud tells its clinician the ward did not answer.
    upstream_call_timeout_s: float = Field(10.0, gt=0, le=120)

    #: Several nodes (docs/howto-cluster.md): this node is one of a cluster on the same
    #: PostgreSQL store and Redis bus; ``node_id`` names it (default: host name and process id).
    cluster: bool = False
    #: A node's right to write a patient's stream lasts this long unless renewed (every third
    #: of it): how long a dead node's patients wait before another node takes them without a
    #: device of theirs connecting to it.
    lease_ttl_s: float = Field(5.0, ge=1, le=300)
    #: A request run on the node that writes the patient's stream is answered within this.
    cluster_call_timeout_s: float = Field(10.0, gt=0, le=120)

    @model_validator(mode="after")
    def _frame_limits(self) -> Settings:
        if (self.certfile is None) != (self.keyfile is None):
            given, missing = (
                ("certfile", "keyfile") if self.keyfile is None else ("keyfile", "certfile")
            )
            raise ValueError(
                f"{given} needs {missing}: TLS takes a certificate and its private key "
                f"(--certfile and --keyfile, or VITALWIRE_CERTFILE and VITALWIRE_KEYFILE)"
            )
        if self.cluster and not self.db.startswith("postgresql"):
            raise ValueError(
                "cluster needs a PostgreSQL store (--db postgresql://...), got "
                f"{self.db.split(':')[0]}"
            )
        if self.cluster and not self.bus.startswith(("redis://", "rediss://")):
            raise ValueError(
                f"cluster needs a Redis bus (--bus redis://...), got {self.bus.split(':')[0]}"
            )
        if self.cluster and self.upstream:
            raise ValueError("cluster and upstream cannot be combined yet: an edge is one node")
        if self.upstream and not self.node_id:
            raise ValueError(
                "upstream needs node_id: an edge node names its cloud (--upstream) and itself "
                "(--node-id)"
            )
        if self.node_id and not (self.upstream or self.cluster):
            raise ValueError(
                "node_id needs upstream or cluster: it names an edge node at its cloud "
                "(--upstream) or a node of a cluster (--cluster)"
            )
        if self.hard_frame_bytes < self.max_frame_bytes:
            raise ValueError(
                f"hard_frame_bytes ({self.hard_frame_bytes}) must be at least "
                f"max_frame_bytes ({self.max_frame_bytes})"
            )
        if self.client_queue_soft > self.client_queue_max:
            raise ValueError("client_queue_soft must not exceed client_queue_max")
        if self.client_queue_max < 2 * max(self.batch_max_rows, self.max_batch):
            raise ValueError(
                f"client_queue_max ({self.client_queue_max}) must be at least twice the largest "
                f"batch ({max(self.batch_max_rows, self.max_batch)}): one commit can push a whole "
                "batch to a client at once"
            )
        return self
