{{/* Names and labels shared by every template. */}}
{{- define "llmpress.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmpress.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llmpress.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llmpress.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (printf "%s-runner" (include "llmpress.fullname" .)) -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The chart's Jobs (register, submit): only the KFP API rights of the jobs Role. */}}
{{- define "llmpress.jobsServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-jobs" (include "llmpress.fullname" .) -}}
{{- else -}}
{{- include "llmpress.serviceAccount" . -}}
{{- end -}}
{{- end -}}

{{/* MLflow, MinIO and the bucket Job: an identity with no Role and no token. */}}
{{- define "llmpress.serverServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-server" (include "llmpress.fullname" .) -}}
{{- else -}}
{{- include "llmpress.serviceAccount" . -}}
{{- end -}}
{{- end -}}

{{- define "llmpress.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "llmpress.cpuImage" -}}
{{- printf "%s/llmpress-cpu:%s" .Values.images.registry (include "llmpress.tag" .) -}}
{{- end -}}

{{- define "llmpress.cudaImage" -}}
{{- printf "%s/llmpress-cuda:%s" .Values.images.registry (include "llmpress.tag" .) -}}
{{- end -}}

{{- define "llmpress.envConfigMap" -}}
{{- printf "%s-env" (include "llmpress.fullname" .) -}}
{{- end -}}

{{- define "llmpress.recipesConfigMap" -}}
{{- printf "%s-recipes" (include "llmpress.fullname" .) -}}
{{- end -}}

{{- define "llmpress.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "llmpress.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "llmpress.mlflowUri" -}}
{{- if .Values.mlflow.externalUri -}}
{{- .Values.mlflow.externalUri -}}
{{- else if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:5000" (include "llmpress.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* MLflow basic-auth's user database: a Secret key (it may hold a password), else SQLite beside the demo store. */}}
{{- define "llmpress.mlflowAuthDatabaseEnv" -}}
- name: AUTH_DATABASE_URI
  {{- if .Values.mlflow.auth.database.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.database.existingSecret }}
      key: {{ .Values.mlflow.auth.database.key }}
  {{- else }}
  value: sqlite:////var/lib/mlflow/basic_auth.db
  {{- end }}
{{- end -}}

{{/* Pod Security Standards "restricted": what every pod of this chart runs with. */}}
{{- define "llmpress.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "llmpress.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The projected token the KFP API accepts (audience-bound, short-lived). */}}
{{- define "llmpress.kfpTokenVolume" -}}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ .Values.kubeflow.tokenAudience }}
          expirationSeconds: 3600
{{- end -}}

{{/* The llmpress CLI in a Job: recipes, defaults, KFP connection. */}}
{{- define "llmpress.jobPod" -}}
serviceAccountName: {{ include "llmpress.jobsServiceAccount" .root }}
automountServiceAccountToken: false
restartPolicy: Never
securityContext:
  {{- include "llmpress.podSecurity" .root | nindent 2 }}
{{- with .root.Values.images.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
containers:
  - name: llmpress
    image: {{ include "llmpress.cpuImage" .root }}
    imagePullPolicy: {{ .root.Values.images.pullPolicy }}
    command: [sh, -c]
    args:
      - {{ .script | quote }}
    env:
      - name: KF_PIPELINES_ENDPOINT
        value: {{ .root.Values.kubeflow.host | quote }}
      - name: KF_PIPELINES_SA_TOKEN_PATH
        value: /var/run/secrets/kubeflow/pipelines/token
      - name: HOME
        value: /tmp
    securityContext:
      {{- include "llmpress.containerSecurity" .root | nindent 6 }}
    resources:
      {{- toYaml .root.Values.jobs.resources | nindent 6 }}
    volumeMounts:
      - {name: recipes, mountPath: /etc/llmpress, readOnly: true}
      - {name: kfp-token, mountPath: /var/run/secrets/kubeflow/pipelines, readOnly: true}
      - {name: tmp, mountPath: /tmp}
volumes:
  - name: recipes
    configMap:
      name: {{ include "llmpress.recipesConfigMap" .root }}
  {{- include "llmpress.kfpTokenVolume" .root | nindent 2 }}
  - name: tmp
    emptyDir: {}
{{- end -}}


{{/* NetworkPolicy egress rules to S3: the bundled MinIO's pods, else networkPolicy.s3. */}}
{{- define "llmpress.s3Egress" -}}
{{- if .Values.minio.enabled -}}
- to:
    - podSelector:
        matchLabels:
          {{- include "llmpress.selector" (dict "root" . "component" "minio") | nindent 10 }}
  ports:
    - {protocol: TCP, port: 9000}
{{- else -}}
- to:
    {{- range .Values.networkPolicy.s3.cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  ports:
    {{- range .Values.networkPolicy.s3.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy egress rules to MLflow (the server deployed here, else networkPolicy.mlflow) and to S3. */}}
{{- define "llmpress.trackingAndS3Egress" -}}
{{- if and .Values.mlflow.enabled (not .Values.mlflow.externalUri) -}}
- to:
    - podSelector:
        matchLabels:
          {{- include "llmpress.selector" (dict "root" . "component" "mlflow") | nindent 10 }}
  ports:
    - {protocol: TCP, port: 5000}
{{- else -}}
- to:
    {{- range .Values.networkPolicy.mlflow.cidrs }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  ports:
    {{- range .Values.networkPolicy.mlflow.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
{{- end }}
{{ include "llmpress.s3Egress" . }}
{{- end -}}


{{/* checkov findings this chart accepts, as checkov.io/skipN annotations, each with its reason. */}}
{{- define "llmpress.checkovSkips" -}}
{{- $reasons := dict
    "CKV_K8S_15" "IfNotPresent - the images are immutable release tags; images.pullPolicy can say Always"
    "CKV_K8S_35" "MLflow, MinIO, mc and boto3 read credentials from env; the manifest holds only secretKeyRef"
    "CKV_K8S_40" "uid 1000 is the images' own user (images/*.Dockerfile); runAsNonRoot is enforced and no host path is mounted"
    "CKV_K8S_43" "referenced by version tag, the same reference compiled pipelines use for step pods (llmpress.pipeline.default_image)" }}
{{- range $i, $id := . }}
checkov.io/skip{{ add1 $i }}: {{ printf "%s=%s" $id (get $reasons $id) | quote }}
{{- end }}
{{- end -}}
