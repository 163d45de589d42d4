//! Nodes reach their scheduler over TLS: they verify it against the cluster's CA, and a
//! scheduler that asks for client certificates turns away a node whose certificate another CA
//! signed. That node still pulls, from the origin.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use damselfly_integration::{fetch, http_client, random_bytes, Mirror, MirrorOpts, Registry, MIB};
use damselfly_scheduler::{SchedulerConfig, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

const REPO: &str = "test/tls";

/// A CA and what it signed, as PEM files in a temporary directory.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Ca { cert, key, dir: dir.to_owned() }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Signs a certificate for `names` (DNS names or IP addresses); writes NAME.pem and NAME.key.
    fn issue(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

async fn metric(node: &Mirror, name: &str, filter: &[(&str, &str)]) -> f64 {
    node.metrics().await.unwrap().sum(name, filter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_pieces_through_a_scheduler_reached_over_mutual_tls() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let stranger_ca = Ca::new(dir.path(), "stranger-ca");
    let (server_cert, server_key) = ca.issue("scheduler", &["127.0.0.1"]);
    let read = |p: &Path| std::fs::read(p).unwrap();
    let config = SchedulerConfig {
        secret: b"scheduler tls test secret".to_vec(),
        announce_interval: Duration::from_secs(2),
        tls: Some(ServerTls {
            cert: read(&server_cert),
            key: read(&server_key),
            client_ca: Some(read(&ca.path("cluster-ca.pem"))),
        }),
        ..SchedulerConfig::default()
    };
    let grpc = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let scheduler = damselfly_scheduler::start(config, grpc, None).await.unwrap();
    let url = format!("https://{}", scheduler.grpc_addr);

    let node = |i: u8, client: (PathBuf, PathBuf)| {
        let mut opts = MirrorOpts::new(&origin.url()).cluster(
            IpAddr::from([127, 0, 0, 2 + i]),
            std::slice::from_ref(&url),
            &format!("tls-node-{i}"),
        );
        opts.config.scheduler_ca = Some(ca.path("cluster-ca.pem"));
        (opts.config.scheduler_cert, opts.config.scheduler_key) = (Some(client.0), Some(client.1));
        Mirror::start(opts)
    };
    let nodes = [
        node(0, ca.issue("node-0", &["tls-node-0"])).await.unwrap(),
        node(1, ca.issue("node-1", &["tls-node-1"])).await.unwrap(),
        node(2, stranger_ca.issue("node-2", &["tls-node-2"])).await.unwrap(),
    ];
    for n in &nodes {
        let url = n.blob_url_ns(REPO, &digest, &origin.host());
        fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    }

    let from_peers = metric(&nodes[1], "damselfly_download_bytes_total", &[("source", "peer")]).await;
    assert_eq!(from_peers, size as f64, "node 1 took the blob from node 0, steered over TLS");
    let refused = &nodes[2];
    assert_eq!(metric(refused, "damselfly_download_bytes_total", &[("source", "peer")]).await, 0.0);
    assert_eq!(metric(refused, "damselfly_download_bytes_total", &[("source", "origin")]).await, size as f64);
    assert!(
        metric(refused, "damselfly_scheduler_errors_total", &[]).await > 0.0,
        "a node with a stranger's certificate is refused by the scheduler"
    );
    let log = origin.settled_access_log().await;
    assert_eq!(log.blob_get_bytes(&digest), 2 * size, "node 0 and the refused node read the origin");
    for n in nodes {
        n.shutdown().await;
    }
    scheduler.shutdown().await;
}
