//! `creditgate admin …`: accounts, keys, top-ups, usage and the ledger through the admin API,
//! as tables for people or, with `--json`, the API's JSON unchanged for scripts.

use clap::{Args, Subcommand};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{AdminClient, Answer, CliError, Endpoint, segment};

/// `creditgate admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Print the API's JSON answer unchanged instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create, show or update accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Create, list or revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Credit top-ups.
    #[command(subcommand)]
    Topups(TopupsCommand),
    /// An account's usage this period, by category, operation and day, and earlier periods.
    Usage {
        /// Account id.
        account: String,
    },
    /// An account's balance changes, newest first, a page at a time.
    Ledger {
        /// Account id.
        account: String,
        /// Entries per page (1 to 500; the gateway's default is 100).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: Option<u16>,
        /// Only entries older than this sequence number (the `next page` hint gives it).
        #[arg(long, conflicts_with = "all")]
        before: Option<u64>,
        /// Every page, following `next_before` to the first entry.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// Create an account.
    Create {
        /// Account id: 1 to 64 of A-Z a-z 0-9 . _ -
        id: String,
        /// Plan name (from the config's `[plans]`).
        #[arg(long)]
        plan: String,
        /// Billing anchor, RFC 3339 (default: now).
        #[arg(long)]
        billing_anchor: Option<String>,
        /// E-mail address for notifications.
        #[arg(long)]
        email: Option<String>,
    },
    /// Show an account's balance and settings.
    Show {
        /// Account id.
        id: String,
    },
    /// Change an account's plan (an upgrade at once, a downgrade at renewal) or e-mail.
    Update {
        /// Account id.
        id: String,
        /// New plan.
        #[arg(long, required_unless_present = "email")]
        plan: Option<String>,
        /// New e-mail address.
        #[arg(long)]
        email: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create an API key; its plaintext is printed this once only.
    Create {
        /// Account id.
        account: String,
        /// `user`, or `system` for automated callers.
        #[arg(long, default_value = "user", value_parser = ["user", "system"])]
        role: String,
    },
    /// List an account's live keys (never their secrets).
    List {
        /// Account id.
        account: String,
    },
    /// Revoke a key (refused on every instance within 5 s).
    Revoke {
        /// Key id (from `keys list`).
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TopupsCommand {
    /// Add top-up credits; the same payment reference credits once, however often it is sent.
    Create {
        /// Account id.
        account: String,
        /// A package name (from the config's `[topup_packages]`).
        #[arg(long, required_unless_present = "credits", conflicts_with = "credits")]
        package: Option<String>,
        /// A number of credits, instead of a package.
        #[arg(long)]
        credits: Option<u64>,
        /// The payment's reference (an invoice or payment id): the idempotency key.
        #[arg(long)]
        payment_ref: String,
    },
    /// List an account's top-ups.
    List {
        /// Account id.
        account: String,
    },
}

/// Most pages `ledger --all` reads (500 entries each: far beyond `history.max_entries`' default).
const MAX_PAGES: usize = 10_000;

/// Runs one `admin` command.
pub fn run(args: AdminArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.endpoint)?;
    super::block_on(execute(&client, args.command, args.json))
}

async fn execute(client: &AdminClient, command: AdminCommand, as_json: bool) -> Result<(), CliError> {
    let print = |answer: &Answer, human: String| {
        if as_json {
            println!("{}", String::from_utf8_lossy(&answer.raw).trim_end());
        } else {
            print!("{human}");
        }
    };
    match command {
        AdminCommand::Accounts(AccountsCommand::Create { id, plan, billing_anchor, email }) => {
            let body = json!({"id": id, "plan": plan, "billing_anchor": billing_anchor, "email": email});
            let a = client.call(Method::POST, "/admin/v1/accounts", Some(without_nulls(body))).await?;
            print(&a, account_text(&a.json));
        }
        AdminCommand::Accounts(AccountsCommand::Show { id }) => {
            let a = client.get(&format!("/admin/v1/accounts/{}", segment(&id))).await?;
            print(&a, account_text(&a.json));
        }
        AdminCommand::Accounts(AccountsCommand::Update { id, plan, email }) => {
            let body = without_nulls(json!({"plan": plan, "email": email}));
            let a = client.call(Method::PATCH, &format!("/admin/v1/accounts/{}", segment(&id)), Some(body)).await?;
            print(&a, account_text(&a.json));
        }
        AdminCommand::Keys(KeysCommand::Create { account, role }) => {
            let path = format!("/admin/v1/accounts/{}/keys", segment(&account));
            let a = client.call(Method::POST, &path, Some(json!({"role": role}))).await?;
            let rows =
                [("key_id", text(&a.json["key_id"])), ("role", text(&a.json["role"])), ("key", text(&a.json["key"]))];
            print(&a, pairs(&rows));
            if !as_json {
                eprintln!("The key is shown only this once: store it now.");
            }
        }
        AdminCommand::Keys(KeysCommand::List { account }) => {
            let a = client.get(&format!("/admin/v1/accounts/{}/keys", segment(&account))).await?;
            let rows = items(&a.json["keys"], &["key_id", "prefix", "role", "created_at"]);
            print(&a, table(&["KEY ID", "PREFIX", "ROLE", "CREATED"], rows));
        }
        AdminCommand::Keys(KeysCommand::Revoke { key_id }) => {
            let a = client.call(Method::DELETE, &format!("/admin/v1/keys/{}", segment(&key_id)), None).await?;
            print(&a, format!("revoked key {} of account {}\n", text(&a.json["key_id"]), text(&a.json["account_id"])));
        }
        AdminCommand::Topups(TopupsCommand::Create { account, package, credits, payment_ref }) => {
            let path = format!("/admin/v1/accounts/{}/topups", segment(&account));
            let body = without_nulls(json!({"package": package, "credits": credits, "payment_ref": payment_ref}));
            let a = client.call(Method::POST, &path, Some(body)).await?;
            let j = &a.json;
            let human = if a.status == StatusCode::CREATED {
                format!(
                    "credited {} top-up credits to {} (payment_ref {}); top-up balance {}\n",
                    text(&j["credits"]),
                    text(&j["account_id"]),
                    text(&j["payment_ref"]),
                    text(&j["topup_remaining"])
                )
            } else {
                format!(
                    "already credited: payment_ref {} added {} credits to {} at {}; nothing added now\n",
                    text(&j["payment_ref"]),
                    text(&j["credits"]),
                    text(&j["account_id"]),
                    text(&j["created_at"])
                )
            };
            print(&a, human);
        }
        AdminCommand::Topups(TopupsCommand::List { account }) => {
            let a = client.get(&format!("/admin/v1/accounts/{}/topups", segment(&account))).await?;
            let rows = items(&a.json["topups"], &["created_at", "kind", "credits", "package", "payment_ref"]);
            print(&a, table(&["AT", "KIND", "CREDITS", "PACKAGE", "PAYMENT REF"], rows));
        }
        AdminCommand::Usage { account } => {
            let a = client.get(&format!("/admin/v1/accounts/{}/usage", segment(&account))).await?;
            print(&a, usage_text(&a.json));
        }
        AdminCommand::Ledger { account, limit, before, all } => {
            return ledger(client, &account, limit, before, all, as_json).await;
        }
    }
    Ok(())
}

async fn ledger(
    client: &AdminClient,
    account: &str,
    limit: Option<u16>,
    before: Option<u64>,
    all: bool,
    as_json: bool,
) -> Result<(), CliError> {
    let page = |before: Option<u64>| {
        let mut query = Vec::new();
        if let Some(l) = limit.or(all.then_some(500)) {
            query.push(format!("limit={l}"));
        }
        if let Some(b) = before {
            query.push(format!("before={b}"));
        }
        let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        format!("/admin/v1/accounts/{}/ledger{q}", segment(account))
    };
    let mut answer = client.get(&page(before)).await?;
    if !all {
        if as_json {
            println!("{}", String::from_utf8_lossy(&answer.raw).trim_end());
        } else {
            print!("{}", ledger_table(&answer.json["entries"]));
            if let Some(next) = answer.json["next_before"].as_u64() {
                println!("next page: --before {next}");
            }
        }
        return Ok(());
    }
    // Every page: one JSON object with all entries (`next_before` null), or one table.
    let mut entries: Vec<Value> = Vec::new();
    for _ in 0..MAX_PAGES {
        entries.extend(answer.json["entries"].as_array().cloned().unwrap_or_default());
        let next = answer.json["next_before"].as_u64();
        // Sequence numbers fall page by page; anything else would loop.
        let Some(next) = next.filter(|n| entries.last().and_then(|e| e["seq"].as_u64()).is_some_and(|s| *n <= s))
        else {
            break;
        };
        answer = client.get(&page(Some(next))).await?;
    }
    let all = json!({"account_id": account, "entries": entries, "next_before": null});
    if as_json {
        println!("{all}");
    } else {
        print!("{}", ledger_table(&all["entries"]));
    }
    Ok(())
}

// === text ===

fn without_nulls(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.retain(|_, x| !x.is_null());
    }
    v
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `label  value` lines, labels padded to one width.
fn pairs(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0);
    rows.iter().map(|(l, v)| format!("{l:<w$}  {v}\n")).collect()
}

/// Rows of `fields` from a JSON array of objects.
fn items(list: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
    list.iter().map(|item| fields.iter().map(|f| text(&item[*f])).collect()).collect()
}

/// A table with a header row, columns padded to their widest cell.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn account_text(a: &Value) -> String {
    let auto = &a["auto_topup"];
    let auto_topup = if auto["enabled"].as_bool() == Some(true) {
        format!("on: package {} when below {}", text(&auto["package"]), text(&auto["threshold"]))
    } else {
        "off".to_owned()
    };
    let mut rows = vec![
        ("id", text(&a["id"])),
        ("plan", text(&a["plan"])),
        ("pending plan", text(&a["pending_plan"])),
        ("email", text(&a["email"])),
        ("remaining", text(&a["remaining"])),
        ("monthly", format!("{} of {}", text(&a["monthly_remaining"]), text(&a["allocation"]))),
        ("top-up", text(&a["topup_remaining"])),
        ("used", format!("{} this period", text(&a["used_this_period"]))),
        ("period", format!("{} → {}", text(&a["period_start"]), text(&a["renews_at"]))),
        ("low", if a["low"].as_bool() == Some(true) { "yes" } else { "no" }.to_owned()),
        ("auto top-up", auto_topup),
        ("queue depth", text(&a["queue_depth"])),
    ];
    if let Some(change) = a.get("plan_change") {
        rows.push(("plan change", text(change)));
    }
    pairs(&rows)
}

fn usage_text(u: &Value) -> String {
    let mut out = pairs(&[
        ("period", format!("{} → {}", text(&u["period_start"]), text(&u["renews_at"]))),
        ("total", format!("{} credits", text(&u["total"]))),
    ]);
    let counts = |v: &Value| -> Vec<Vec<String>> {
        v.as_object().map(|m| m.iter().map(|(k, n)| vec![k.clone(), text(n)]).collect()).unwrap_or_default()
    };
    out.push('\n');
    out.push_str(&table(&["CATEGORY", "CREDITS"], counts(&u["by_category"])));
    out.push('\n');
    out.push_str(&table(&["OPERATION", "CREDITS"], counts(&u["by_operation"])));
    let days: Vec<Vec<String>> = items(&u["daily"], &["date", "credits"]).into_iter().filter(|r| r[1] != "0").collect();
    out.push('\n');
    out.push_str(&table(&["DAY", "CREDITS"], days));
    let earlier = items(&u["earlier_periods"], &["period_start", "period_end", "credits"]);
    if !earlier.is_empty() {
        out.push('\n');
        out.push_str(&table(&["EARLIER PERIOD", "UNTIL", "CREDITS"], earlier));
    }
    out
}

fn ledger_table(entries: &Value) -> String {
    let list = entries.as_array().map(Vec::as_slice).unwrap_or_default();
    let rows = list
        .iter()
        .map(|e| {
            let detail: Vec<String> = ["operation", "payment_ref", "package", "plan", "charge_id"]
                .iter()
                .filter_map(|f| e[*f].as_str().map(|v| format!("{f}={v}")))
                .collect();
            vec![
                text(&e["seq"]),
                text(&e["at"]),
                text(&e["kind"]),
                signed(&e["monthly_delta"]),
                signed(&e["topup_delta"]),
                text(&e["monthly_after"]),
                text(&e["topup_after"]),
                detail.join(" "),
            ]
        })
        .collect();
    table(&["SEQ", "AT", "KIND", "MONTHLY Δ", "TOP-UP Δ", "MONTHLY", "TOP-UP", "DETAIL"], rows)
}

/// A delta with its sign (`+200`, `-3`, `0`).
fn signed(v: &Value) -> String {
    match v.as_i64() {
        Some(n) if n > 0 => format!("+{n}"),
        Some(n) => n.to_string(),
        None => text(v),
    }
}
