//! Problem documents (RFC 9457) read back: what a refusal says, for the clients
//! that show a person only one line. Apart from `response`, which renders them
//! from the configuration, so that MCP's answers can use it without reaching the
//! configuration.

use serde_json::Value;

/// `"Payment Required: <detail> (price 5, balance 1)"`: a refusal in one line for a
/// person, as clients that show only a message (MCP's, OpenAI's) display it.
pub fn summary(problem: &Value) -> String {
    let text = |k: &str| problem.get(k).and_then(Value::as_str);
    let mut message = text("title").unwrap_or("Refused").to_string();
    if let Some(detail) = text("detail") {
        message.push_str(": ");
        message.push_str(detail);
    }
    let numbers: Vec<String> = ["price", "balance"]
        .iter()
        .filter_map(|k| {
            problem
                .get(*k)
                .and_then(Value::as_i64)
                .map(|n| format!("{k} {n}"))
        })
        .collect();
    if !numbers.is_empty() {
        message.push_str(&format!(" ({})", numbers.join(", ")));
    }
    message
}
