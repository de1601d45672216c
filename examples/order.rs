//! The quick start: an order workflow that calls activities in sequence and then in
//! parallel, on the embedded SQLite store.
//!
//! ```sh
//! cargo run --example order              # keeps its state in target/keel-examples/order.db
//! cargo run --example order -- orders.db # or in a database file of your choice
//! cargo run --example order -- postgres://postgres@127.0.0.1/test    # or in PostgreSQL
//! cargo run --example order -- postgres://postgres@127.0.0.1/test redis://127.0.0.1:6379
//! ```
//!
//! Run it twice: the second run opens the same database, finds the first order
//! finished there (its activities do not run again) and places the next one.

use std::path::PathBuf;
use std::time::Duration;

use keel::prelude::*;
use serde::{Deserialize, Serialize};

/// The database used when no path is given: under `target/`, out of the way.
const DEFAULT_DATABASE: &str = "target/keel-examples/order.db";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    reservation: String,
    payment: String,
    /// The parcel and the email, sent in parallel.
    sent: Vec<String>,
}

// Activities do the side effects. Keel records each result, so a workflow that is
// replayed (after a crash, a restart or a deploy) never runs a finished one again.

async fn reserve(_ctx: ActivityContext, order: Order) -> Result<String, Failure> {
    println!("  activity: reserving {} x {}", order.quantity, order.item);
    Ok(format!("reservation-{}-{}", order.item, order.quantity))
}

async fn charge(_ctx: ActivityContext, cents: u64) -> Result<String, Failure> {
    println!("  activity: charging {cents} cents");
    Ok(format!("payment-{cents}"))
}

async fn ship(_ctx: ActivityContext, reservation: String) -> Result<String, Failure> {
    println!("  activity: shipping {reservation}");
    Ok(format!("parcel-for-{reservation}"))
}

async fn email(_ctx: ActivityContext, payment: String) -> Result<String, Failure> {
    println!("  activity: emailing the receipt for {payment}");
    Ok(format!("email-for-{payment}"))
}

// The orchestration is the workflow: plain async code, deterministic, that Keel
// can replay from its recorded history.
async fn place_order(ctx: OrchestrationContext, order: Order) -> Result<Receipt, Failure> {
    // In sequence: reserve the stock, then take the payment.
    let reservation: String = ctx.activity("reserve", &order).await?;
    let payment: String = ctx.activity("charge", &order.cents).await?;
    // In parallel: ship the parcel and email the receipt.
    let sent = join_all([
        ctx.activity("ship", &reservation),
        ctx.activity("email", &payment),
    ])
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    Ok(Receipt {
        reservation,
        payment,
        sent,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The store: a SQLite file (the default) or a PostgreSQL URL; then, optionally, the
    // URL of a Redis that carries wake-ups between processes.
    let mut args = std::env::args().skip(1);
    let store = args.next().unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
    let builder = if store.starts_with("postgres://") || store.starts_with("postgresql://") {
        println!("database: PostgreSQL at {store}");
        Keel::builder().postgres(store)
    } else {
        let path = PathBuf::from(store);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        println!("database: {}", path.display());
        Keel::builder().sqlite(path)
    };
    let builder = match args.next() {
        Some(redis) => {
            println!("wake-ups: Redis at {redis}");
            builder.redis(redis)
        }
        None => builder,
    };

    let keel = builder
        .activity("reserve", reserve)
        .activity("charge", charge)
        .activity("ship", ship)
        .activity("email", email)
        .orchestration("order", place_order)
        .start()
        .await?;
    let client = keel.client();

    // One deterministic id per order: order-1, order-2, ... The orders placed by
    // earlier runs are in the database; this run places the next one.
    let mut number = 1;
    loop {
        let id = InstanceId::new(format!("order-{number}"))?;
        match client.status(&id).await {
            Ok(info) => {
                // Completed, normally; if an earlier run was stopped half-way through
                // it, this run's worker finishes it from where it was.
                let earlier: Receipt = client.wait(&id, Duration::from_secs(30)).await?;
                let status = info.status();
                println!("{id} was placed by an earlier run ({status}): {earlier:?}");
                number += 1;
            }
            Err(keel::Error::NotFound(_)) => break,
            Err(error) => return Err(error.into()),
        }
    }

    let order = Order {
        item: "teapot".to_owned(),
        quantity: number,
        cents: 1250 * u64::from(number),
    };
    let id = client
        .start("order", &order)
        .id(format!("order-{number}"))
        .await?;
    println!("started {id}: {order:?}");
    let receipt: Receipt = client.wait(&id, Duration::from_secs(30)).await?;
    println!("{id} completed: {receipt:?}");

    keel.shutdown().await;
    Ok(())
}
