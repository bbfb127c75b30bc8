//! LLM token classes and per-model price tables: what a response's reported usage
//! costs, and what a request may cost at most (the hold). Pure logic; the meter
//! (src/usage.rs) finds the usage in the body and the gate reads the request.
//!
//! Money stays integral: a price is a whole number of units per `per_tokens`
//! tokens (1 = per token, 1000000 = per million). A response's cost is
//! `ceil(sum over classes of tokens × price / per_tokens)`: the products are
//! summed exactly (u128) and rounded up once per response, so a response is never
//! charged less than its tokens are worth, and by less than one unit more. A cost
//! above the largest amount (2^53 - 1) is that amount.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::amount::MAX_AMOUNT;

/// Whose usage shape the body has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI Chat Completions (and compatible): `prompt_tokens`, `completion_tokens`,
    /// with cached and reasoning tokens counted inside them.
    OpenAiChat,
    /// OpenAI Responses: `input_tokens`, `output_tokens`, details inside them.
    OpenAiResponses,
    /// OpenAI Embeddings: `prompt_tokens` only.
    Embeddings,
    /// Anthropic Messages: `input_tokens` excludes the cache reads and writes.
    Anthropic,
}

impl Api {
    pub fn parse(name: &str) -> Option<Api> {
        Some(match name {
            "openai_chat" => Api::OpenAiChat,
            "openai_responses" => Api::OpenAiResponses,
            "openai_embeddings" => Api::Embeddings,
            "anthropic_messages" => Api::Anthropic,
            _ => return None,
        })
    }

    /// The request field that bounds the output tokens.
    fn max_output_fields(self) -> &'static [&'static str] {
        match self {
            Api::OpenAiChat => &["max_completion_tokens", "max_tokens"],
            Api::OpenAiResponses => &["max_output_tokens"],
            Api::Anthropic => &["max_tokens"],
            Api::Embeddings => &[],
        }
    }
}

/// Tokens per class, the classes disjoint (a cached token is not also an input token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub input: u64,
    pub cached_input: u64,
    pub cache_creation_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

/// Units per `per_tokens` tokens, per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub cached_input: u64,
    pub cache_creation_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

/// Usage as an API reports it: the latest value of each field seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reported {
    input: Option<u64>,
    cached: Option<u64>,
    cache_creation: Option<u64>,
    output: Option<u64>,
    reasoning: Option<u64>,
}

fn field(obj: &Value, pointer: &str) -> Option<u64> {
    obj.pointer(pointer).and_then(Value::as_u64)
}

impl Reported {
    /// Takes the fields `usage` (a usage object of `api`'s shape) carries; fields it
    /// lacks keep their earlier values (Anthropic's `message_delta` may repeat only some).
    pub fn update(&mut self, api: Api, usage: &Value) {
        let (input, cached, creation, output, reasoning) = match api {
            Api::OpenAiChat | Api::Embeddings => (
                "/prompt_tokens",
                "/prompt_tokens_details/cached_tokens",
                "",
                "/completion_tokens",
                "/completion_tokens_details/reasoning_tokens",
            ),
            Api::OpenAiResponses => (
                "/input_tokens",
                "/input_tokens_details/cached_tokens",
                "",
                "/output_tokens",
                "/output_tokens_details/reasoning_tokens",
            ),
            Api::Anthropic => (
                "/input_tokens",
                "/cache_read_input_tokens",
                "/cache_creation_input_tokens",
                "/output_tokens",
                "",
            ),
        };
        let take = |slot: &mut Option<u64>, pointer: &str| {
            if !pointer.is_empty() {
                if let Some(n) = field(usage, pointer) {
                    *slot = Some(n);
                }
            }
        };
        take(&mut self.input, input);
        take(&mut self.cached, cached);
        take(&mut self.cache_creation, creation);
        take(&mut self.output, output);
        take(&mut self.reasoning, reasoning);
    }

    /// Whether anything that prices was seen: input tokens at the least.
    pub fn any(&self) -> bool {
        self.input.is_some()
    }

    /// Disjoint classes. OpenAI counts cached tokens inside the input and reasoning
    /// tokens inside the output; a detail larger than its total is capped at it.
    pub fn tokens(&self, api: Api) -> Tokens {
        let input = self.input.unwrap_or(0);
        let output = self.output.unwrap_or(0);
        match api {
            Api::Anthropic => Tokens {
                input,
                cached_input: self.cached.unwrap_or(0),
                cache_creation_input: self.cache_creation.unwrap_or(0),
                output,
                reasoning: 0,
            },
            Api::OpenAiChat | Api::OpenAiResponses | Api::Embeddings => {
                let cached = self.cached.unwrap_or(0).min(input);
                let reasoning = self.reasoning.unwrap_or(0).min(output);
                Tokens {
                    input: input - cached,
                    cached_input: cached,
                    cache_creation_input: 0,
                    output: output - reasoning,
                    reasoning,
                }
            }
        }
    }
}

/// What a model missing from the table costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownModel {
    /// The request is refused with 400 naming the model.
    Refuse,
    /// Priced like this.
    Default(Prices),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFrom {
    Request,
    Response,
}

/// A route's token pricing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    pub api: Api,
    pub per_tokens: u64,
    pub models: BTreeMap<String, Prices>,
    pub unknown: UnknownModel,
    pub model_from: ModelFrom,
    /// The most a fitted hold may be.
    pub max_hold: u64,
}

/// Longest model name kept (a longer one is not in any table).
pub const MAX_MODEL_LEN: usize = 128;

impl PriceTable {
    /// The prices for `model`, or `None` if it is unknown and refused.
    pub fn prices(&self, model: Option<&str>) -> Option<&Prices> {
        match (model.and_then(|m| self.models.get(m)), &self.unknown) {
            (Some(p), _) => Some(p),
            (None, UnknownModel::Default(p)) => Some(p),
            (None, UnknownModel::Refuse) => None,
        }
    }

    /// `ceil(sum(tokens × price) / per_tokens)`, at most [`MAX_AMOUNT`].
    pub fn cost(&self, prices: &Prices, t: &Tokens) -> u64 {
        let pairs = [
            (t.input, prices.input),
            (t.cached_input, prices.cached_input),
            (t.cache_creation_input, prices.cache_creation_input),
            (t.output, prices.output),
            (t.reasoning, prices.reasoning),
        ];
        // A u64 × u64 product fits in u128; their sum saturates (and is then capped).
        let sum: u128 = pairs.iter().fold(0u128, |acc, (n, p)| {
            acc.saturating_add(u128::from(*n) * u128::from(*p))
        });
        let per = u128::from(self.per_tokens.max(1));
        let units = sum.div_ceil(per);
        u64::try_from(units).unwrap_or(u64::MAX).min(MAX_AMOUNT)
    }

    /// The hold for a request body: `max output × the dearer of output and reasoning
    /// price + body bytes × the dearest input price` (a token is at least one byte of
    /// the JSON that carries it), at most `max_hold`. `None` when the request names no
    /// output bound (the route's fixed estimate is held) or is not JSON.
    pub fn hold(&self, prices: &Prices, request: &Value, body_len: usize) -> Option<u64> {
        let max_output = self
            .api
            .max_output_fields()
            .iter()
            .find_map(|f| request.get(*f).and_then(Value::as_u64));
        let max_output = match self.api {
            Api::Embeddings => 0,
            _ => max_output?,
        };
        let input_price = prices
            .input
            .max(prices.cached_input)
            .max(prices.cache_creation_input);
        let t = Tokens {
            input: u64::try_from(body_len).unwrap_or(u64::MAX),
            output: max_output,
            ..Tokens::default()
        };
        let p = Prices {
            input: input_price,
            output: prices.output.max(prices.reasoning),
            cached_input: 0,
            cache_creation_input: 0,
            reasoning: 0,
        };
        Some(self.cost(&p, &t).clamp(1, self.max_hold.max(1)))
    }
}

/// The `model` a request or response document names (the response's may sit in
/// `message` (Anthropic's `message_start`) or `response` (Responses API events)).
pub fn model_in(doc: &Value) -> Option<&str> {
    ["/model", "/message/model", "/response/model"]
        .iter()
        .find_map(|p| doc.pointer(p).and_then(Value::as_str))
        .filter(|m| m.len() <= MAX_MODEL_LEN)
}

/// The usage object a response document carries, wherever its API puts it.
pub fn usage_in(doc: &Value) -> Option<&Value> {
    ["/usage", "/message/usage", "/response/usage"]
        .iter()
        .find_map(|p| doc.pointer(p).filter(|u| u.is_object()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(api: Api, per: u64) -> PriceTable {
        let mut models = BTreeMap::new();
        models.insert(
            "m".to_string(),
            Prices {
                input: 3,
                cached_input: 1,
                cache_creation_input: 4,
                output: 15,
                reasoning: 20,
            },
        );
        PriceTable {
            api,
            per_tokens: per,
            models,
            unknown: UnknownModel::Refuse,
            model_from: ModelFrom::Request,
            max_hold: 1_000_000,
        }
    }

    #[test]
    fn classes_are_disjoint_per_api() {
        let mut r = Reported::default();
        r.update(
            Api::OpenAiResponses,
            &json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
                    "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 17}),
        );
        let t = r.tokens(Api::OpenAiResponses);
        assert_eq!(
            t,
            Tokens {
                input: 6,
                cached_input: 4,
                cache_creation_input: 0,
                output: 2,
                reasoning: 5
            }
        );
        let tb = table(Api::OpenAiResponses, 1);
        let p = *tb.prices(Some("m")).unwrap();
        assert_eq!(tb.cost(&p, &t), 6 * 3 + 4 + 2 * 15 + 5 * 20);

        // Anthropic: input excludes the cache; message_delta repeats only some fields.
        let mut r = Reported::default();
        r.update(
            Api::Anthropic,
            &json!({"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20, "output_tokens": 1}),
        );
        r.update(Api::Anthropic, &json!({"output_tokens": 9}));
        let t = r.tokens(Api::Anthropic);
        assert_eq!(
            (t.input, t.cached_input, t.cache_creation_input, t.output),
            (5, 100, 20, 9)
        );
        // A detail larger than its total is capped (no underflow).
        let mut r = Reported::default();
        r.update(
            Api::OpenAiChat,
            &json!({"prompt_tokens": 2, "prompt_tokens_details": {"cached_tokens": 9}, "completion_tokens": 1}),
        );
        assert_eq!(r.tokens(Api::OpenAiChat).input, 0);
        assert_eq!(r.tokens(Api::OpenAiChat).cached_input, 2);
    }

    #[test]
    fn per_million_rounds_up_once_and_saturates() {
        let tb = table(Api::OpenAiChat, 1_000_000);
        let p = *tb.prices(Some("m")).unwrap();
        let t = Tokens {
            input: 1,
            ..Tokens::default()
        };
        assert_eq!(tb.cost(&p, &t), 1, "3 units per million: one token costs 1");
        let t = Tokens {
            input: 1_000_000,
            output: 1_000_000,
            ..Tokens::default()
        };
        assert_eq!(tb.cost(&p, &t), 18);
        let t = Tokens {
            input: 333_334,
            ..Tokens::default()
        };
        assert_eq!(tb.cost(&p, &t), 2, "1_000_002 / 1M rounds up to 2");
        let huge = Prices {
            input: u64::MAX,
            cached_input: u64::MAX,
            cache_creation_input: u64::MAX,
            output: u64::MAX,
            reasoning: u64::MAX,
        };
        let t = Tokens {
            input: u64::MAX,
            cached_input: u64::MAX,
            cache_creation_input: u64::MAX,
            output: u64::MAX,
            reasoning: u64::MAX,
        };
        assert_eq!(tb.cost(&huge, &t), MAX_AMOUNT);
    }

    #[test]
    fn unknown_models_and_holds() {
        let mut tb = table(Api::Anthropic, 1);
        assert!(tb.prices(Some("other")).is_none());
        assert!(tb.prices(None).is_none());
        let d = Prices {
            input: 1,
            cached_input: 1,
            cache_creation_input: 1,
            output: 1,
            reasoning: 1,
        };
        tb.unknown = UnknownModel::Default(d);
        assert_eq!(tb.prices(Some("other")), Some(&d));
        let p = *tb.prices(Some("m")).unwrap();
        // 50 output × 20 (reasoning, dearer than output) + 10 bytes × 4 (the dearest input class).
        assert_eq!(tb.hold(&p, &json!({"max_tokens": 50}), 10), Some(1040));
        assert_eq!(tb.hold(&p, &json!({}), 10), None, "no bound: the estimate");
        tb.max_hold = 100;
        assert_eq!(tb.hold(&p, &json!({"max_tokens": 50}), 10), Some(100));
        tb.api = Api::Embeddings;
        assert_eq!(tb.hold(&p, &json!({"input": "x"}), 10), Some(40));
    }

    #[test]
    fn finds_usage_and_model_in_each_shape() {
        let start = json!({"type": "message_start", "message": {"model": "claude", "usage": {"input_tokens": 1}}});
        assert_eq!(model_in(&start), Some("claude"));
        assert!(usage_in(&start).is_some());
        let done = json!({"type": "response.completed", "response": {"model": "gpt", "usage": {"input_tokens": 1}}});
        assert_eq!(model_in(&done), Some("gpt"));
        assert!(usage_in(&json!({"usage": null})).is_none());
        assert!(model_in(&json!({"model": "x".repeat(200)})).is_none());
    }
}
