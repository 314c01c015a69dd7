use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A Kafka broker of its own (KRaft, single node, loopback), for tests that stop or kill one
/// without disturbing the shared `dev/up` broker. Uses the jars `dev/up` fetched.
pub struct KafkaBroker {
    node_id: u32,
    port: u16,
    advertised_port: u16,
    controller_port: u16,
    /// `id@host:port,...` of every controller in the cluster.
    voters: String,
    replication: u32,
    dir: PathBuf,
    process: Option<Child>,
    started: Option<std::sync::mpsc::Receiver<()>>,
}

fn libs_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOX_KAFKA_LIBS") {
        return dir.into();
    }
    let cache = std::env::var("OUTBOX_DEV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/outbox-dev")
        });
    cache.join("kafka/libs")
}

/// A loopback port nothing listens on, never one this process handed out before: the kernel may
/// return a just-released port again, and two listeners of one broker (or two brokers of one
/// cluster) on the same port make Kafka refuse its configuration.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if claim_port(port) {
            return port;
        }
    }
}

/// Whether `port` was not handed out before in this process; it is from now on.
pub(crate) fn claim_port(port: u16) -> bool {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    handed_out.insert(port)
}

impl KafkaBroker {
    /// Picks ports and formats storage; the broker is not started yet, so a client pointed at
    /// [`KafkaBroker::bootstrap_servers`] finds nothing listening.
    pub fn new() -> Self {
        let controller_port = free_port();
        Self::node(
            1,
            controller_port,
            format!("1@127.0.0.1:{controller_port}"),
            1,
        )
    }

    /// A cluster of `size` brokers (each also a KRaft controller), replication factor `size` and
    /// `min.insync.replicas` = `size - 1` by default; none started yet.
    pub fn cluster(size: u32) -> Vec<Self> {
        let controller_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let voters = controller_ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}@127.0.0.1:{port}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        controller_ports
            .iter()
            .enumerate()
            .map(|(i, port)| Self::node(i as u32 + 1, *port, voters.clone(), size))
            .collect()
    }

    fn node(node_id: u32, controller_port: u16, voters: String, replication: u32) -> Self {
        let libs = libs_dir();
        assert!(
            libs.join(".complete").exists(),
            "the Kafka broker jars are missing at {}\nRun dev/up first: it fetches them",
            libs.display()
        );
        let dir = std::env::temp_dir().join(format!("outbox-test-kafka-{}", crate::short_id()));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let port = free_port();
        let broker = KafkaBroker {
            node_id,
            port,
            advertised_port: port,
            controller_port,
            voters,
            replication,
            dir,
            process: None,
            started: None,
        };
        std::fs::write(broker.dir.join("server.properties"), broker.properties())
            .expect("properties");
        let status = broker
            .java()
            .args([
                "kafka.tools.StorageTool",
                "format",
                "-t",
                "q1Sh-9_ISia_zwGINzRvyQ",
                "-c",
            ])
            .arg(broker.dir.join("server.properties"))
            .stdout(Stdio::null())
            .status()
            .expect("run Kafka's StorageTool");
        assert!(
            status.success(),
            "formatting the test broker's storage failed"
        );
        broker
    }

    fn properties(&self) -> String {
        let min_isr = self.replication.saturating_sub(1).max(1);
        format!(
            "process.roles=broker,controller\nnode.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{a}\n\
             controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={dir}/data\nauto.create.topics.enable=false\n\
             offsets.topic.replication.factor={r}\noffsets.topic.num.partitions=1\n\
             default.replication.factor={r}\nmin.insync.replicas={min_isr}\n\
             transaction.state.log.replication.factor={r}\ntransaction.state.log.min.isr={min_isr}\n\
             share.coordinator.state.topic.replication.factor={r}\nshare.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n",
            id = self.node_id,
            voters = self.voters,
            r = self.replication,
            p = self.port,
            a = self.advertised_port,
            c = self.controller_port,
            dir = self.dir.display()
        )
    }

    fn java(&self) -> Command {
        let mut command = Command::new("java");
        command
            .args([
                "-Xms128m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log_config().display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs_dir().display()));
        command
    }

    fn log_config(&self) -> PathBuf {
        let path = self.dir.join("log4j2.properties");
        if !path.exists() {
            std::fs::write(
                &path,
                "rootLogger.level=WARN\nrootLogger.appenderRef.out.ref=out\n\
                 appender.out.type=Console\nappender.out.name=out\n\
                 appender.out.layout.type=PatternLayout\nappender.out.layout.pattern=%m%n\n\
                 logger.server.name=kafka.server.KafkaRaftServer\nlogger.server.level=INFO\n",
            )
            .expect("log config");
        }
        path
    }

    /// The port the broker listens on (a proxy in front of it targets this).
    pub fn listen_port(&self) -> u16 {
        self.port
    }

    /// Makes the broker tell clients to connect through `port` (a proxy in front of it), so all
    /// client traffic, not only the bootstrap connection, passes the proxy. Call before `start`.
    pub fn advertise_port(&mut self, port: u16) {
        self.advertised_port = port;
        std::fs::write(self.dir.join("server.properties"), self.properties()).expect("properties");
    }

    /// `host:port` clients use (the advertised address).
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    /// Starts (or restarts) the broker and waits until it serves requests.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_started();
    }

    /// Starts the broker without waiting (the nodes of a cluster must start together: none
    /// is up before a quorum of controllers is).
    pub fn spawn(&mut self) {
        assert!(self.process.is_none(), "broker already running");
        let mut child = self
            .java()
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Kafka broker");
        let stdout = child.stdout.take().expect("stdout");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Kafka Server started") {
                    let _ = started_tx.send(());
                }
            }
        });
        self.started = Some(started_rx);
        self.process = Some(child);
    }

    /// Waits until a spawned broker serves requests.
    pub fn wait_started(&mut self) {
        let started = self.started.take().expect("spawn() first");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if started.recv_timeout(Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.process.as_mut().map(Child::try_wait) {
                panic!("the test Kafka broker exited during startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the test Kafka broker did not start within 120s"
            );
        }
    }

    /// This broker's node id.
    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    /// SIGKILLs the broker: no clean shutdown, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Default for KafkaBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
