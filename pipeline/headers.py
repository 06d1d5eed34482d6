"""Request/reply header names, the same as Spring Kafka's ReplyingKafkaTemplate."""

CORRELATION = "kafka_correlationId"
REPLY_TOPIC = "kafka_replyTopic"
REPLY_PARTITION = "kafka_replyPartition"  # 4-byte big-endian int
