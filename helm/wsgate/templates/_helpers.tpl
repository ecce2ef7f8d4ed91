{{/*
Names and labels.
*/}}
{{- define "wsgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wsgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wsgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's pods of any kind (gateways, bundled Redis). */}}
{{- define "wsgate.baseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The gateway pods only (not the bundled Redis). */}}
{{- define "wsgate.selectorLabels" -}}
{{ include "wsgate.baseSelectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "wsgate.labels" -}}
helm.sh/chart: {{ include "wsgate.chart" . }}
{{ include "wsgate.baseSelectorLabels" . }}
app.kubernetes.io/version: {{ include "wsgate.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsgate
{{- end }}

{{- define "wsgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wsgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image. The tag defaults to the appVersion; "latest" is refused here as well as by the
schema, so that --set image.tag=latest cannot slip through.
*/}}
{{- define "wsgate.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{- define "wsgate.image" -}}
{{- $tag := include "wsgate.imageTag" . }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: 'latest' is not allowed; pin a version (or image.digest)" }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Seconds in a duration of the form the gateway's flags take, restricted to one unit
("500ms", "10s", "2m", "1h"; the schema enforces it). Milliseconds round up.
*/}}
{{- define "wsgate.seconds" -}}
{{- $d := toString . }}
{{- if regexMatch "^[0-9]+ms$" $d }}
{{- div (add (trimSuffix "ms" $d | int) 999) 1000 }}
{{- else if regexMatch "^[0-9]+s$" $d }}
{{- trimSuffix "s" $d | int }}
{{- else if regexMatch "^[0-9]+m$" $d }}
{{- mul (trimSuffix "m" $d | int) 60 }}
{{- else if regexMatch "^[0-9]+h$" $d }}
{{- mul (trimSuffix "h" $d | int) 3600 }}
{{- else }}
{{- fail (printf "cannot read the duration %q: use a number with one unit, e.g. 10s" $d) }}
{{- end }}
{{- end }}

{{- define "wsgate.drainSeconds" -}}
{{- include "wsgate.seconds" (.Values.config.drainTimeout | default "10s") }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the kubelet kills the container this long after it starts
stopping it (preStop included), so it must outlast the drain window.
*/}}
{{- define "wsgate.gracePeriod" -}}
{{- $drain := include "wsgate.drainSeconds" . | int }}
{{- $grace := add $drain .Values.drain.graceMarginSeconds }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $grace = .Values.terminationGracePeriodSeconds | int }}
{{- end }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than config.drainTimeout (%ds), or pods are killed before their clients are drained" $grace $drain) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/*
Secrets: the name, and the keys it holds (as a JSON list).
*/}}
{{- define "wsgate.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "wsgate.fullname" .) }}
{{- end }}

{{- define "wsgate.secretKeys" -}}
{{- $keys := list }}
{{- if .Values.secrets.existingSecret }}
{{- $keys = .Values.secrets.existingSecretKeys }}
{{- else }}
{{- if .Values.secrets.apiKey }}{{ $keys = append $keys "api-key" }}{{ end }}
{{- if .Values.secrets.jwtSecret }}{{ $keys = append $keys "jwt-secret" }}{{ end }}
{{- if .Values.secrets.jwtPublicKey }}{{ $keys = append $keys "jwt-public-key" }}{{ end }}
{{- if or .Values.secrets.redisPassword .Values.redis.bundled.enabled }}{{ $keys = append $keys "redis-password" }}{{ end }}
{{- if .Values.secrets.redisSentinelPassword }}{{ $keys = append $keys "redis-sentinel-password" }}{{ end }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{- define "wsgate.hasSecretKey" -}}
{{- if has .key (include "wsgate.secretKeys" .ctx | fromJsonArray) }}true{{ end }}
{{- end }}

{{/*
The Redis URL the gateway gets, without the password (empty: no Redis).
*/}}
{{- define "wsgate.redisBaseUrl" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "wsgate.fullname" .) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
The URL gets "username@" after the scheme when an ACL user is set. The password is not
in it: WSGATE_REDIS_PASSWORD comes from the Secret (so it needs no URL-encoding and never
appears in the pod spec).
*/}}
{{- define "wsgate.redisUrl" -}}
{{- $urls := list }}
{{- with include "wsgate.redisBaseUrl" . }}{{ $urls = append $urls . }}{{ end }}
{{- if and $urls (eq .Values.redis.mode "cluster") }}
{{- /* Cluster mode: more seed nodes, comma-separated after redis.url. */}}
{{- range .Values.redis.clusterSeeds }}{{ $urls = append $urls . }}{{ end }}
{{- end }}
{{- $out := list }}
{{- range $urls }}
{{- $out = append $out (include "wsgate.redisUrlWithUser" (dict "ctx" $ "url" .)) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/* One Redis URL with "username@" inserted when an ACL user is set. */}}
{{- define "wsgate.redisUrlWithUser" -}}
{{- $url := .url }}
{{- if .ctx.Values.redis.username }}
{{- $parts := regexSplit "://" $url 2 }}
{{- if ne (len $parts) 2 }}
{{- fail (printf "redis.url or redis.clusterSeeds entry %q has no scheme (redis:// or rediss://)" $url) }}
{{- end }}
{{- printf "%s://%s@%s" (index $parts 0) .ctx.Values.redis.username (index $parts 1) }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}

{{/* Whether the gateways use Redis at all ("true" or empty). */}}
{{- define "wsgate.redisEnabled" -}}
{{- if or (include "wsgate.redisBaseUrl" .) .Values.redis.sentinel.addresses }}true{{ end }}
{{- end }}

{{/*
Refuse configurations that would run but not work.
*/}}
{{- define "wsgate.validate" -}}
{{- $multi := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- if and $multi (not (include "wsgate.redisEnabled" .)) }}
{{- fail "more than one wsgate pod needs Redis for fan-out between pods (a message published on one pod would not reach subscribers on the others): set redis.url, or redis.bundled.enabled=true to try it out" }}
{{- end }}
{{- if and .Values.redis.bundled.enabled (eq .Values.redis.mode "cluster") }}
{{- fail "redis.mode=cluster needs a Redis Cluster (redis.url and redis.clusterSeeds); the bundled Redis is a single instance" }}
{{- end }}
{{- if and (eq .Values.redis.mode "cluster") .Values.redis.sentinel.addresses }}
{{- fail "redis.mode=cluster does not take redis.sentinel (a cluster fails over by itself)" }}
{{- end }}
{{- if eq .Values.redis.mode "cluster" }}
{{- $scheme := ternary "rediss://" "redis://" (hasPrefix "rediss://" (include "wsgate.redisBaseUrl" .)) }}
{{- range .Values.redis.clusterSeeds }}
{{- if not (hasPrefix $scheme .) }}
{{- fail (printf "redis.clusterSeeds entry %q must use the scheme of redis.url (%s): every node of a cluster speaks TLS or none does" . $scheme) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.redis.clusterSeeds (ne .Values.redis.mode "cluster") }}
{{- fail "redis.clusterSeeds is only used with redis.mode=cluster" }}
{{- end }}
{{- if and .Values.redis.bundled.enabled .Values.redis.url }}
{{- fail "set either redis.url or redis.bundled.enabled, not both" }}
{{- end }}
{{- if and .Values.redis.bundled.enabled .Values.secrets.existingSecret (not (has "redis-password" .Values.secrets.existingSecretKeys)) }}
{{- fail "redis.bundled.enabled with secrets.existingSecret needs a redis-password key in it (list it in secrets.existingSecretKeys)" }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.ingress.websocketAnnotations }}
{{- $hb := include "wsgate.seconds" (.Values.config.heartbeatInterval | default "25s") | int }}
{{- if le (int .Values.ingress.websocketTimeoutSeconds) $hb }}
{{- fail (printf "ingress.websocketTimeoutSeconds (%d) must be above config.heartbeatInterval (%ds), or the ingress cuts idle but healthy connections" (int .Values.ingress.websocketTimeoutSeconds) $hb) }}
{{- end }}
{{- end }}
{{- if and .Values.redis.sentinel.addresses (not .Values.redis.sentinel.masterName) }}
{{- fail "redis.sentinel.addresses needs redis.sentinel.masterName" }}
{{- end }}
{{- if and .Values.redis.sentinel.addresses .Values.redis.bundled.enabled }}
{{- fail "redis.sentinel and redis.bundled.enabled do not go together (the bundled Redis has no sentinels)" }}
{{- end }}
{{- if and .Values.redis.tls.secretName (not (hasPrefix "rediss://" (include "wsgate.redisBaseUrl" .))) }}
{{- fail "redis.tls.secretName needs a rediss:// redis.url" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- $_ := include "wsgate.gracePeriod" . }}
{{- end }}

{{/*
A config value as an env var string: Helm reads YAML numbers as floats, which would
print as 1.048576e+06; whole numbers are written as integers, fractions (a rebalance
margin of 0.1) as they are.
*/}}
{{- define "wsgate.envValue" -}}
{{- if or (kindIs "int64" .) (kindIs "int" .) }}
{{- . | toString }}
{{- else if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- . | int64 | toString }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
A value in TOML: whole numbers without a fraction or exponent (Helm reads YAML numbers
as floats), anything else as JSON, which is valid TOML for strings, booleans and lists
of them.
*/}}
{{- define "wsgate.tomlValue" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- . | int64 | toString }}
{{- else }}
{{- toJson . }}
{{- end }}
{{- end }}

{{/*
wsgate.toml (docs/configuration.md) from .Values.namespaces: one [[namespaces]] table
each, its keys in snake_case (historySize -> history_size). Empty without namespaces.
*/}}
{{- define "wsgate.configToml" -}}
{{- with .Values.namespaces -}}
# Rendered by the wsgate Helm chart from .Values.namespaces (docs/configuration.md).
{{- range . }}

[[namespaces]]
name = {{ toJson .name }}
topics = {{ toJson .topics }}
{{- range $key, $value := omit . "name" "topics" }}
{{ $key | snakecase }} = {{ include "wsgate.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
