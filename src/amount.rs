//! Amounts of money: integer units of the account's currency, never fractions, and
//! never more than a JSON number carries exactly (the balance service and its
//! clients read them as JSON). Every module that reads or sums amounts bounds them here.

/// Largest integer every JSON implementation reads exactly (2^53 - 1).
pub const MAX_AMOUNT: u64 = 9_007_199_254_740_991;
