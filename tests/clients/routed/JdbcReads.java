// The customer's reads through the PostgreSQL JDBC driver (unnamed statements, then named
// server-side ones after prepareThreshold executions): run directly on legacy and through a
// proxy serving them from the target by tests/routing_clients.rs, which compares the two
// transcripts.
import java.sql.*;
import java.util.*;

public class JdbcReads {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", "postgres");
        props.setProperty("prepareThreshold", "3");
        List<String> out = new ArrayList<>();
        try (Connection c = DriverManager.getConnection(args[0], props);
             PreparedStatement byId = c.prepareStatement("SELECT * FROM affiliates WHERE affiliate_id = ?");
             PreparedStatement children = c.prepareStatement(
                 "SELECT affiliate_id, name, registration_date FROM affiliates\n"
                 + "WHERE parent_affiliate_id = ? ORDER BY registration_date, affiliate_id")) {
            for (int round = 0; round < 2; round++) {
                for (long i = 1; i <= 40; i++) {
                    byId.setLong(1, i);
                    out.add("by_id\t" + rows(byId.executeQuery()));
                    children.setLong(1, i);
                    out.add("children\t" + rows(children.executeQuery()));
                }
            }
        }
        for (String line : out) System.out.println(line);
    }

    static String rows(ResultSet rs) throws SQLException {
        StringBuilder sb = new StringBuilder();
        ResultSetMetaData md = rs.getMetaData();
        while (rs.next()) {
            for (int i = 1; i <= md.getColumnCount(); i++) {
                sb.append(md.getColumnName(i)).append(':').append(md.getColumnTypeName(i)).append('=')
                  .append(rs.getString(i)).append(';');
            }
            sb.append('|');
        }
        rs.close();
        return sb.toString();
    }
}
