"""The AWS IoT Just-In-Time Registration Lambda (standard library and boto3 only)."""
