//! psycopg 3 as a driver of the model (tests/clients/model_psycopg.py): one Python process
//! per connection, a transaction sent as a JSON line, its answers read back as one.

use std::process::Stdio;

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

pub struct Psycopg {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Psycopg {
    /// A connection to `url` (fails the test with the command to run when psycopg is missing).
    pub fn connect(url: &str) -> Self {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/model_psycopg.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run python3 (psycopg: run ./scripts/test, which installs it, or `pip install 'psycopg[binary]'`)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Runs one transaction (see the script for its shape); its answers in order.
    pub async fn run(&mut self, tx: &Value) -> Vec<Value> {
        let mut line = tx.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to psycopg");
        self.stdin.flush().await.expect("write to psycopg");
        let answer = self.lines.next_line().await.expect("read from psycopg");
        let Some(answer) = answer else {
            let status = self.child.wait().await;
            panic!(
                "psycopg's driver ended ({status:?}): is psycopg installed (run ./scripts/test, which installs it, or `pip install 'psycopg[binary]'`)?"
            );
        };
        match serde_json::from_str(&answer) {
            Ok(Value::Array(answers)) => answers,
            _ => panic!("psycopg's driver answered {answer}"),
        }
    }
}
