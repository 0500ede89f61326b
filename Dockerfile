FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends beanstalkd \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY kqs ./kqs
RUN pip install --no-cache-dir .
VOLUME /data
EXPOSE 14151
# Bind all interfaces inside the container; publish the port only where it is safe.
CMD ["kqs", "serve", "--data-dir", "/data", "--bind", "0.0.0.0"]
