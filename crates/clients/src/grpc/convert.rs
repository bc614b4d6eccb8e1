//! Conversions between prost messages and the ports' types. prost types stop here.

use batch_domain::preference::{Frequency, Preference};
use batch_domain::time::parse_weekday;
use batch_domain::{FeatureType, TemplateId, TenantId, TimeOfDay, UserId};
use batch_proto::config::v1 as pb;
use batch_proto::json::from_struct;

/// A preference as the Config service sends it, checked: ids must parse; a time of day,
/// weekday or frequency that does not parse is an error naming the field (a wrong time zone is
/// kept: grouping falls back and reports it).
pub(super) fn preference(message: &pb::Preference) -> Result<Preference, String> {
    let field = |name: &str, e: &dyn std::fmt::Display| {
        format!("preference of user {:?}: {name}: {e}", message.user_id)
    };
    let frequency = match pb::Frequency::try_from(message.frequency) {
        Ok(pb::Frequency::Unspecified) => None,
        Ok(pb::Frequency::Hourly) => Some(Frequency::Hourly),
        Ok(pb::Frequency::Daily) => Some(Frequency::Daily),
        Ok(pb::Frequency::Weekly) => Some(Frequency::Weekly),
        Ok(pb::Frequency::Biweekly) => Some(Frequency::Biweekly),
        Ok(pb::Frequency::Monthly) => Some(Frequency::Monthly),
        Err(e) => return Err(field("frequency", &e)),
    };
    let optional = |text: &str| (!text.trim().is_empty()).then(|| text.trim().to_owned());
    Ok(Preference {
        tenant: TenantId::parse(&message.tenant_id).map_err(|e| field("tenant_id", &e))?,
        user: UserId::parse(&message.user_id).map_err(|e| field("user_id", &e))?,
        feature_type: FeatureType::parse(&message.feature_type)
            .map_err(|e| field("feature_type", &e))?,
        frequency,
        time_of_day: optional(&message.time_of_day)
            .map(|t| TimeOfDay::parse(&t))
            .transpose()
            .map_err(|e| field("time_of_day", &e))?,
        time_zone: optional(&message.time_zone),
        weekday: optional(&message.weekday)
            .map(|d| parse_weekday(&d))
            .transpose()
            .map_err(|e| field("weekday", &e))?,
        day_of_month: (message.day_of_month > 0).then_some(message.day_of_month),
        template_override: optional(&message.template_override)
            .map(TemplateId::parse)
            .transpose()
            .map_err(|e| field("template_override", &e))?,
        parameters: message
            .parameters
            .as_ref()
            .map(from_struct)
            .unwrap_or_default(),
        enabled: message.enabled,
        version: message.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_are_checked_field_by_field() {
        let message = pb::Preference {
            tenant_id: "acme".to_owned(),
            user_id: "alice".to_owned(),
            feature_type: "briefing".to_owned(),
            frequency: pb::Frequency::Weekly as i32,
            time_of_day: "09:30".to_owned(),
            time_zone: "Mars/Olympus".to_owned(),
            weekday: "tuesday".to_owned(),
            enabled: true,
            version: 4,
            ..pb::Preference::default()
        };
        let parsed = preference(&message).unwrap();
        assert_eq!(parsed.frequency, Some(Frequency::Weekly));
        assert_eq!(parsed.time_zone.as_deref(), Some("Mars/Olympus"));
        assert_eq!(parsed.weekday, Some(chrono::Weekday::Tue));
        let broken = pb::Preference {
            time_of_day: "25:00".to_owned(),
            ..message
        };
        let error = preference(&broken).unwrap_err();
        assert!(error.contains("time_of_day"), "{error}");
        assert!(error.contains("alice"), "{error}");
    }
}
