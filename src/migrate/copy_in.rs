//! `COPY … FROM STDIN` in text format, written row by row into a buffer and sent to the
//! server about a mebibyte at a time (the backfill's plan and closure, the fixture's rows).

use std::pin::Pin;

use bytes::BytesMut;
use futures_util::SinkExt;
use tokio_postgres::{Client, CopyInSink};

/// How much `COPY` text is sent at a time.
const CHUNK: usize = 1 << 20;

pub struct CopyIn {
    sink: Pin<Box<CopyInSink<bytes::Bytes>>>,
    buf: BytesMut,
}

impl CopyIn {
    /// Starts `sql` (a `COPY … FROM STDIN`).
    pub async fn start(client: &Client, sql: &str) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            sink: Box::pin(client.copy_in(sql).await?),
            buf: BytesMut::with_capacity(CHUNK + 1024),
        })
    }

    /// Where the next rows are written (whole rows, each ending in a newline).
    pub fn rows(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Sends what is written once it is a chunk's worth; call after each row or few.
    pub async fn flush_full(&mut self) -> Result<(), tokio_postgres::Error> {
        if self.buf.len() >= CHUNK {
            self.sink.send(self.buf.split().freeze()).await?;
        }
        Ok(())
    }

    /// Sends the rest and ends the `COPY`; the rows it loaded.
    pub async fn finish(mut self) -> Result<u64, tokio_postgres::Error> {
        if !self.buf.is_empty() {
            self.sink.send(self.buf.split().freeze()).await?;
        }
        self.sink.as_mut().finish().await
    }
}
