//! The harness against a real server: one shared cluster per process, one database per test,
//! nothing left running after a drop.

use std::net::{Ipv4Addr, TcpStream};
use std::ptr;

use postgres::{Client, NoTls};

/// Connects to `url`, which a cluster of this process just handed out.
fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).unwrap_or_else(|err| panic!("connecting to {url}: {err:?}"))
}

#[test]
fn shared_is_one_cluster_per_process() {
    let first = hatch_pgtest::shared();
    let second = hatch_pgtest::shared();
    assert!(ptr::eq(first, second));
    assert_eq!(first.url(), format!("postgres://hatch@127.0.0.1:{}/postgres", first.port()));
    let rows = connect(&first.url()).query("SELECT 1", &[]).unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 1);
}

#[test]
fn each_fresh_database_is_empty_and_its_own() {
    let cluster = hatch_pgtest::shared();
    let (url_a, url_b) = (cluster.fresh_database(), cluster.fresh_database());
    assert_ne!(url_a, url_b);
    let (mut a, mut b) = (connect(&url_a), connect(&url_b));
    // The same table name in both: it would collide if they were one database.
    a.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)").unwrap();
    b.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (30)").unwrap();
    let values = |db: &mut Client| -> Vec<i32> {
        db.query("SELECT x FROM t ORDER BY x", &[]).unwrap().iter().map(|row| row.get(0)).collect()
    };
    assert_eq!(values(&mut a), [1, 2]);
    assert_eq!(values(&mut b), [30]);
}

#[test]
fn a_dropped_cluster_stops_its_server() {
    let cluster = hatch_pgtest::Cluster::start();
    let port = cluster.port();
    assert_ne!(port, hatch_pgtest::shared().port());
    // A connection still open at drop: the server must not wait for it to close.
    let mut open = connect(&cluster.fresh_database());
    open.batch_execute("CREATE TABLE t (x int)").unwrap();
    drop(cluster);
    let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    assert!(refused.is_err(), "port {port} still accepts connections after the drop");
    assert!(open.batch_execute("SELECT 1").is_err(), "the old session still answers");
}
