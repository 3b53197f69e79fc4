//! MQTT 3.1.1 and MQTT 5, both ways. The proxy speaks MQTT 5 inside and upstream: a 3.1.1
//! client's packets become their MQTT 5 equivalents as they arrive, and what goes back to it
//! loses what 3.1.1 cannot say (properties, reason strings, reason codes it has no code for).
//! Pure functions, tested below.

use std::num::NonZeroU16;

use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{
    self, ConnectAckReason, Disconnect, DisconnectReasonCode, PublishAck, PublishAck2, PublishAck2Reason,
    PublishAckReason, RetainHandling, SubscribeAckReason, SubscriptionOptions,
};

/// The session expiry that stands for MQTT 3.1.1's `clean_session = false`: the session never
/// expires (MQTT 5 3.1.2.11.2).
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// A 3.1.1 CONNECT as MQTT 5 says it; `receive_max` is what the proxy lets the upstream broker
/// have in flight towards this client (3.1.1 has no such limit of its own).
pub fn connect_to_v5(connect: v3::Connect, receive_max: NonZeroU16) -> v5::Connect {
    v5::Connect {
        clean_start: connect.clean_session,
        keep_alive: connect.keep_alive,
        session_expiry_interval_secs: if connect.clean_session { 0 } else { SESSION_NEVER_EXPIRES },
        auth_method: None,
        auth_data: None,
        request_problem_info: true,
        request_response_info: false,
        receive_max: Some(receive_max),
        topic_alias_max: 0,
        user_properties: Vec::new(),
        max_packet_size: None,
        last_will: connect.last_will.map(|will| v5::LastWill {
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            message: will.message,
            will_delay_interval_sec: None,
            correlation_data: None,
            message_expiry_interval: None,
            content_type: None,
            user_properties: Vec::new(),
            is_utf8_payload: None,
            response_topic: None,
        }),
        client_id: connect.client_id,
        username: connect.username,
        password: connect.password,
        cert: None,
    }
}

/// An MQTT 5 CONNACK for a 3.1.1 client: the nearest of its six return codes.
pub fn connack_to_v3(ack: &v5::ConnectAck) -> v3::ConnectAck {
    use v3::ConnectAckReason as V3;
    let return_code = match ack.reason_code {
        ConnectAckReason::Success => V3::ConnectionAccepted,
        ConnectAckReason::UnsupportedProtocolVersion => V3::UnacceptableProtocolVersion,
        ConnectAckReason::ClientIdentifierNotValid => V3::IdentifierRejected,
        ConnectAckReason::BadUserNameOrPassword => V3::BadUserNameOrPassword,
        ConnectAckReason::NotAuthorized | ConnectAckReason::Banned | ConnectAckReason::BadAuthenticationMethod => {
            V3::NotAuthorized
        }
        _ => V3::ServiceUnavailable,
    };
    v3::ConnectAck { session_present: ack.session_present, return_code }
}

/// A packet from a 3.1.1 client as MQTT 5 says it. None: a packet no client sends after its
/// CONNECT (a protocol error: the proxy closes the connection).
pub fn to_v5(packet: v3::Packet) -> Option<v5::Packet> {
    use v3::Packet as P;
    Some(match packet {
        P::Publish(publish) => v5::Packet::Publish(publish),
        P::PublishAck { packet_id } => v5::Packet::PublishAck(ack(packet_id)),
        P::PublishReceived { packet_id } => v5::Packet::PublishReceived(ack(packet_id)),
        P::PublishRelease { packet_id } => v5::Packet::PublishRelease(ack2(packet_id)),
        P::PublishComplete { packet_id } => v5::Packet::PublishComplete(ack2(packet_id)),
        P::Subscribe { packet_id, topic_filters } => v5::Packet::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: topic_filters
                .into_iter()
                .map(|(filter, qos)| {
                    let options = SubscriptionOptions {
                        qos,
                        no_local: false,
                        // 3.1.1: RETAIN is set only on what a new subscription gets (MQTT-3.3.1-8/9).
                        retain_as_published: false,
                        retain_handling: RetainHandling::AtSubscribe,
                    };
                    (filter, options)
                })
                .collect(),
        }),
        P::Unsubscribe { packet_id, topic_filters } => {
            v5::Packet::Unsubscribe(v5::Unsubscribe { packet_id, user_properties: Vec::new(), topic_filters })
        }
        P::PingRequest => v5::Packet::PingRequest,
        P::Disconnect => v5::Packet::Disconnect(disconnect(DisconnectReasonCode::NormalDisconnection)),
        P::Connect(_) | P::ConnectAck(_) | P::SubscribeAck { .. } | P::UnsubscribeAck { .. } | P::PingResponse => {
            return None;
        }
    })
}

/// A packet for a 3.1.1 client. None: nothing 3.1.1 can say (a server's DISCONNECT, AUTH: the
/// connection closes without a word).
pub fn to_v3(packet: v5::Packet) -> Option<v3::Packet> {
    use v5::Packet as P;
    Some(match packet {
        P::ConnectAck(ack) => v3::Packet::ConnectAck(connack_to_v3(&ack)),
        P::Publish(mut publish) => {
            publish.properties = None;
            v3::Packet::Publish(publish)
        }
        P::PublishAck(ack) => v3::Packet::PublishAck { packet_id: ack.packet_id },
        P::PublishReceived(ack) => v3::Packet::PublishReceived { packet_id: ack.packet_id },
        P::PublishRelease(ack) => v3::Packet::PublishRelease { packet_id: ack.packet_id },
        P::PublishComplete(ack) => v3::Packet::PublishComplete { packet_id: ack.packet_id },
        P::SubscribeAck(ack) => v3::Packet::SubscribeAck {
            packet_id: ack.packet_id,
            status: ack.status.iter().map(|reason| subscribe_return_code(*reason)).collect(),
        },
        P::UnsubscribeAck(ack) => v3::Packet::UnsubscribeAck { packet_id: ack.packet_id },
        P::PingResponse => v3::Packet::PingResponse,
        P::Connect(_) | P::Subscribe(_) | P::Unsubscribe(_) | P::PingRequest | P::Disconnect(_) | P::Auth(_) => {
            return None;
        }
    })
}

fn subscribe_return_code(reason: SubscribeAckReason) -> v3::SubscribeReturnCode {
    match reason {
        SubscribeAckReason::GrantedQos0 => v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
        SubscribeAckReason::GrantedQos1 => v3::SubscribeReturnCode::Success(QoS::AtLeastOnce),
        SubscribeAckReason::GrantedQos2 => v3::SubscribeReturnCode::Success(QoS::ExactlyOnce),
        _ => v3::SubscribeReturnCode::Failure,
    }
}

/// The QoS a SUBACK granted, or None: refused.
pub fn granted(reason: SubscribeAckReason) -> Option<QoS> {
    match reason {
        SubscribeAckReason::GrantedQos0 => Some(QoS::AtMostOnce),
        SubscribeAckReason::GrantedQos1 => Some(QoS::AtLeastOnce),
        SubscribeAckReason::GrantedQos2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

pub fn ack(packet_id: NonZeroU16) -> PublishAck {
    ack_with(packet_id, PublishAckReason::Success)
}

pub fn ack_with(packet_id: NonZeroU16, reason_code: PublishAckReason) -> PublishAck {
    PublishAck { packet_id, reason_code, properties: Vec::new(), reason_string: None }
}

pub fn ack2(packet_id: NonZeroU16) -> PublishAck2 {
    PublishAck2 { packet_id, reason_code: PublishAck2Reason::Success, properties: Vec::new(), reason_string: None }
}

pub fn disconnect(reason_code: DisconnectReasonCode) -> Disconnect {
    Disconnect {
        reason_code,
        session_expiry_interval_secs: None,
        server_reference: None,
        reason_string: None,
        user_properties: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmqtt_codec::types::Publish;
    use rmqtt_codec::v5::PublishProperties;

    fn id(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    #[test]
    fn a_3_1_1_persistent_session_never_expires_and_a_clean_one_ends_with_the_connection() {
        let connect = v3::Connect { clean_session: false, client_id: "c".into(), ..Default::default() };
        let v5 = connect_to_v5(connect, id(20));
        assert_eq!((v5.clean_start, v5.session_expiry_interval_secs), (false, SESSION_NEVER_EXPIRES));
        assert_eq!((v5.topic_alias_max, v5.receive_max), (0, Some(id(20))), "no topic aliases upstream");
        let clean = connect_to_v5(v3::Connect { clean_session: true, ..Default::default() }, id(20));
        assert_eq!(clean.session_expiry_interval_secs, 0);
    }

    #[test]
    fn refusals_keep_their_meaning_in_3_1_1() {
        let refused = |reason_code| connack_to_v3(&v5::ConnectAck { reason_code, ..Default::default() }).return_code;
        use v3::ConnectAckReason as V3;
        assert_eq!(refused(ConnectAckReason::Success), V3::ConnectionAccepted);
        assert_eq!(refused(ConnectAckReason::BadUserNameOrPassword), V3::BadUserNameOrPassword);
        assert_eq!(refused(ConnectAckReason::NotAuthorized), V3::NotAuthorized);
        assert_eq!(refused(ConnectAckReason::ClientIdentifierNotValid), V3::IdentifierRejected);
        assert_eq!(refused(ConnectAckReason::ServerBusy), V3::ServiceUnavailable);
    }

    #[test]
    fn a_3_1_1_client_sees_no_property_and_no_reason_it_cannot_read() {
        let publish = Publish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: "t".into(),
            packet_id: Some(id(3)),
            payload: "x".into(),
            properties: Some(PublishProperties {
                user_properties: vec![("x-offline-id".into(), "offline:1".into())],
                ..Default::default()
            }),
        };
        let Some(v3::Packet::Publish(out)) = to_v3(v5::Packet::Publish(Box::new(publish))) else { panic!() };
        assert_eq!((out.properties, out.packet_id), (None, Some(id(3))));
        let suback = v5::SubscribeAck {
            packet_id: id(4),
            properties: Vec::new(),
            reason_string: Some("why".into()),
            status: vec![SubscribeAckReason::GrantedQos1, SubscribeAckReason::NotAuthorized],
        };
        let Some(v3::Packet::SubscribeAck { status, .. }) = to_v3(v5::Packet::SubscribeAck(suback)) else { panic!() };
        assert_eq!(status, [v3::SubscribeReturnCode::Success(QoS::AtLeastOnce), v3::SubscribeReturnCode::Failure]);
        assert_eq!(to_v3(v5::Packet::Disconnect(disconnect(DisconnectReasonCode::SessionTakenOver))), None);
    }

    #[test]
    fn a_3_1_1_subscribe_keeps_its_filters_in_order_with_their_qos() {
        let subscribe = v3::Packet::Subscribe {
            packet_id: id(9),
            topic_filters: vec![("a/#".into(), QoS::ExactlyOnce), ("$share/g/b".into(), QoS::AtMostOnce)],
        };
        let Some(v5::Packet::Subscribe(out)) = to_v5(subscribe) else { panic!() };
        let filters: Vec<_> = out.topic_filters.iter().map(|(f, o)| (f.to_string(), o.qos)).collect();
        assert_eq!(filters, [("a/#".to_owned(), QoS::ExactlyOnce), ("$share/g/b".to_owned(), QoS::AtMostOnce)]);
        assert_eq!(to_v5(v3::Packet::PingResponse), None, "a client does not send PINGRESP");
    }
}
