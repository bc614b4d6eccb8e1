//! JSON ↔ `google.protobuf.Struct`, the one conversion every user of these contracts needs:
//! payloads, parameters, results and contexts travel as `Struct`s.

use prost_types::value::Kind;
use serde_json::{Map, Value};

/// A JSON object as a protobuf `Struct`.
pub fn to_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

/// Any JSON value as a `Struct`: objects as they are, anything else under `value`.
pub fn value_to_struct(value: &Value) -> prost_types::Struct {
    match value {
        Value::Object(map) => to_struct(map),
        other => {
            let mut map = Map::new();
            map.insert("value".to_owned(), other.clone());
            to_struct(&map)
        }
    }
}

fn to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf `Struct` as a JSON object.
pub fn from_struct(value: &prost_types::Struct) -> Map<String, Value> {
    value
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), from_value(v)))
        .collect()
}

fn from_value(value: &prost_types::Value) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers come back as integers, as they were sent.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                #[allow(clippy::cast_possible_truncation)]
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(map)) => Value::Object(from_struct(map)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_struct() {
        let value = json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": -3}});
        let Value::Object(map) = &value else {
            unreachable!()
        };
        assert_eq!(Value::Object(from_struct(&to_struct(map))), value);
        assert_eq!(
            Value::Object(from_struct(&value_to_struct(&json!("text")))),
            json!({"value": "text"})
        );
    }
}
